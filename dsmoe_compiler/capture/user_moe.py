"""Recogniser for MoE blocks written by users as plain torch ops (no transformers markers).

Pattern: a router ``F.linear(x, W_r[, b_r])`` -> softmax or sigmoid -> ``topk`` (or top-k of the
logits then softmax over the k values), optionally renormalised, feeding experts that are either an
``nn.ModuleList`` of SwiGLU MLPs (per-expert 2-D weights) or 3-D weight tensors indexed by expert.
The block's output is found by liveness: the first node after the top-k where every value that
depends on the routing has died except one (in-place accumulations are first made explicit by
``graph_utils.ssa_inplace``).

Replacement: ``dualsparse.moe(x, [router, expert weights...], spec)``.

Equivalence: the recogniser only proposes candidate specs (score function, renormalisation,
activation, layout) from the graph's structure and parameter names; a candidate is accepted only if
``reference.moe`` reproduces the original subgraph's output on the graph's own example inputs
(rtol 1e-4). No candidate reproduces it -> the block is left alone and reported. Tests:
``tests/test_capture_user.py``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from dsmoe_compiler.capture.fuse_markers import EXPERTS, MOE
from dsmoe_compiler.capture.graph_utils import (CASTS, VIEWS, block_name, example_value, is_call, recorded_values,
                                                region_between, source_path, strip, topk_of)
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec
from dsmoe_compiler.report import BlockEntry, LeftAlone

_CASTS = {"float", "to", "type", "half", "bfloat16", "double"}
_ROLE_NAMES = {"gate": ("w1", "gate_proj", "gate", "wg", "w_gate"), "up": ("w3", "up_proj", "up", "wu", "w_up"),
               "down": ("w2", "down_proj", "down", "wd", "w_down")}
_ACTIVATION_CALLS = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", torch.sigmoid: None}


def _strip_casts(node: fx.Node) -> fx.Node:
    return strip(node, _CASTS)


def _softmax_or_sigmoid(node: fx.Node) -> str | None:
    if is_call(node, (torch.softmax, F.softmax, torch.nn.functional.softmax), ("softmax",)):
        return "softmax"
    if is_call(node, (torch.sigmoid, F.sigmoid), ("sigmoid",)):
        return "sigmoid"
    return None


def _router(topk: fx.Node):
    """(linear node, score function, score_after_topk) of the router feeding ``topk``, or None."""
    src = _strip_casts(topk.args[0])
    score = _softmax_or_sigmoid(src)
    if score is not None:
        linear = _strip_casts(src.args[0])
        after = False
    else:
        linear, score, after = src, "softmax", True
    if not is_call(linear, (F.linear,)) or linear.args[1].op != "placeholder":
        return None
    return linear, score, after


def _liveness_end(gm: fx.GraphModule, topk: fx.Node, shape) -> fx.Node | None:
    """First node after ``topk`` at which exactly one routing-dependent value, of the block's input shape, is live."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dependent, live = {topk}, {topk}
    for node in list(gm.graph.nodes)[order[topk] + 1:]:
        if not any(a in dependent for a in node.all_input_nodes):
            continue
        dependent.add(node)
        live.add(node)
        live = {n for n in live if any(order[u] > order[node] for u in n.users)}
        if live == {node} and node.op != "output" and getattr(example_value(node), "shape", None) == shape:
            return node
    return None


def _mutates_outside(region: list[fx.Node]) -> bool:
    """An in-place method on a tensor from outside the region: replacing the region would lose the write."""
    inside = set(region)
    return any(n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__")
               and n.args[0] not in inside for n in region)


def _role(path: str) -> str | None:
    leaf = [p for p in path.split(".") if p not in ("weight", "bias")][-1]
    for role, names in _ROLE_NAMES.items():
        if leaf in names:
            return role
    return None


def _expert_candidates(params: list[fx.Node], E: int, H: int):
    """Yield (ExpertsSpec fields, slots, tensors-as-nodes, intermediate) layouts the weights allow."""
    named = [(source_path(p) or p.name, p) for p in params]
    three_d = [(path, p) for path, p in named if example_value(p).dim() == 3 and example_value(p).shape[0] == E]
    if three_d:
        roles = {_role(path): p for path, p in three_d}
        if "down" in roles and ("gate" in roles or "up" in roles):
            yield from _separate_3d(roles, H)
        return
    per_expert: dict[int, dict[str, fx.Node]] = {}
    for path, p in named:
        m = re.search(r"\.(\d+)\.([^.]+)\.(weight|bias)$", path)
        if m and int(m.group(1)) < E:
            key = m.group(2) + ("" if m.group(3) == "weight" else "_bias")
            per_expert.setdefault(int(m.group(1)), {})[key] = p
    if sorted(per_expert) != list(range(E)):
        return
    roles = {k: _role(k) for k in per_expert[0] if not k.endswith("_bias")}
    if sorted(roles.values(), key=str) != ["down", "gate", "up"]:
        return
    by_role = {r: k for k, r in roles.items()}
    slots, nodes = [], []
    for e in range(E):
        for role in ("gate", "up", "down"):
            slots.append(f"{role}.{e}")
            nodes.append(per_expert[e][by_role[role]])
    inter = example_value(per_expert[0][by_role["gate"]]).shape[0]
    yield {"layout": "list"}, slots, nodes, inter


def _separate_3d(roles, H):
    gate, up, down = roles.get("gate"), roles.get("up"), roles["down"]
    shape = example_value(gate if gate is not None else up).shape
    for transposed in (False, True):
        if (shape[2] if not transposed else shape[1]) != H:
            continue
        inter = shape[1] if not transposed else shape[2]
        yield {"layout": "separate", "transposed": transposed}, ["gate", "up", "down"], [gate, up, down], inter


def _activation(region: list[fx.Node]) -> list[str]:
    found = [_ACTIVATION_CALLS.get(n.target) for n in region if n.op == "call_function"]
    found = [a for a in found if a]
    return found[:1] or ["silu", "gelu", "gelu_tanh", "relu"]


def _try_candidates(spec_args, candidates, x_val, params_for, target):
    router_slots = spec_args.pop("slots")
    for routing, (fields, slots, nodes, inter), activation in candidates:
        spec = MoESpec(**spec_args, intermediate=inter, routing=routing,
                       experts=ExpertsSpec(**fields, activation=activation), slots=router_slots + tuple(slots))
        try:
            out = reference.moe(x_val, params_for(nodes), spec)
        except (RuntimeError, IndexError, ValueError):
            continue
        if out.shape == target.shape and _reproduces(out, target):
            return spec, nodes
    return None, None


# 90th percentile of per-token relative error a candidate may show in a low-precision graph: the user's
# code and the reference round differently (measured ~1e-3 per token in fp16, up to ~1e-2 in bf16
# where the user's einsum rounds its gathered products), and a router near-tie can flip a token or two;
# a wrong candidate (renormalisation, score function, activation) is off on nearly every token by far more.
LOW_PRECISION_TOKEN_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _reproduces(out: torch.Tensor, target: torch.Tensor) -> bool:
    tol = LOW_PRECISION_TOKEN_TOL.get(target.dtype)
    if tol is None:  # fp32 / fp64: the same answer up to summation order
        return torch.allclose(out.float(), target.float(), rtol=1e-4, atol=1e-5 * (1 + target.abs().max().item()))
    out, target = out.double().flatten(0, -2), target.double().flatten(0, -2)
    if not torch.isfinite(out).all() or target.shape[0] == 0:
        return False
    floor = 1e-6 * target.norm() / target.shape[0] ** 0.5  # tokens whose output is ~0 compare absolutely
    per_token = (out - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(floor)
    return torch.quantile(per_token, 0.9).item() <= tol


@dataclass
class _Block:
    """A block the structure suggests, before the numerical check."""

    name: str
    x: fx.Node
    end: fx.Node
    region: list[fx.Node]
    router_nodes: list[fx.Node]
    spec_args: dict
    candidates: list


def capture_user_moe(gm: fx.GraphModule, example_inputs, options, report) -> list[fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value_of = dict(zip(placeholders, example_inputs))
    blocks = []
    marked = _topks_of_experts_markers(gm)  # transformers blocks: fuse_markers / route_graph report those
    for topk in [n for n in gm.graph.nodes if is_call(n, (torch.topk,), ("topk",)) and n not in marked]:
        block = _guarded(report, topk, lambda: _describe(gm, topk, value_of, report))
        if block is not None:
            blocks.append(block)
    if not blocks:
        return []
    # one run of the graph checks every block (the rewrites below keep these nodes' values)
    values = _guarded(report, blocks[0].end, lambda: recorded_values(gm, example_inputs, {n for b in blocks for n in (b.x, b.end)}))
    if values is None:
        return []
    new_nodes = []
    for block in blocks:
        if any(getattr(n, "_erased", False) for n in (block.x, block.end, *block.region)):  # inside an earlier block
            continue
        moe = _guarded(report, block.end, lambda: _verify_and_rewrite(gm, block, values, value_of, report))
        if moe is not None:
            new_nodes.append(moe)
    return new_nodes


def _topks_of_experts_markers(gm: fx.GraphModule) -> set[fx.Node]:
    """The top-k nodes whose indices (up to casts and views) feed a ``dualsparse.experts`` marker left in the graph,
    or a ``dualsparse.moe`` node that takes its routing from the graph (``fuse_markers._given_routing``)."""
    found = set()
    for node in gm.graph.nodes:
        if is_call(node, (EXPERTS, EXPERTS._overloadpacket)):
            index = node.args[1]
        elif is_call(node, (MOE,)) and "topk_index" in (slots := reference.parse_spec(node.args[2]).slots):
            index = node.args[1][slots.index("topk_index")]
        else:
            continue
        topk = topk_of(strip(index, CASTS | VIEWS), 1)  # as route_graph reads the indices
        if topk is not None:
            found.add(topk)
    return found


def _guarded(report, node, step):
    try:
        return step()
    except Exception as error:  # a recogniser bug must never break the user's compile
        report.left_alone.append(LeftAlone(node.name, f"recogniser error: {error!r}"))
        return None


def _describe(gm, topk, value_of, report) -> _Block | None:
    found = _router(topk)
    if found is None:
        return None
    linear, score_func, after = found
    name = block_name(linear) or linear.name
    if any(entry.name == name for entry in report.left_alone):  # a transformers marker already said why
        return None
    x = linear.args[0]
    end = _liveness_end(gm, topk, example_value(x).shape)
    if end is None:
        report.left_alone.append(LeftAlone(name, "could not find where the routed experts end"))
        return None
    region = region_between(end, x)
    if _mutates_outside(region):
        report.left_alone.append(LeftAlone(name, "the block mutates a tensor it did not create"))
        return None
    router_nodes = [linear.args[1]] + ([linear.args[2]] if len(linear.args) > 2 and linear.args[2] is not None else [])
    params = [p for p in dict.fromkeys(a for n in region for a in n.all_input_nodes if a.op == "placeholder")
              if p not in router_nodes and isinstance(value_of.get(p), torch.Tensor)]
    E, H = example_value(linear.args[1]).shape
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs["k"]
    routings = [RoutingSpec(score_func=score_func, score_after_topk=after, renormalize=r, router_bias=len(router_nodes) > 1)
                for r in (False, True)]
    layouts = list(_expert_candidates(params, E, H))
    if not isinstance(k, int) or not layouts:
        report.left_alone.append(LeftAlone(name, "router found but the experts' weights were not recognised"))
        return None
    spec_args = dict(name=name, num_experts=E, top_k=k, hidden=H,
                     slots=("router_weight", "router_bias")[:len(router_nodes)])
    candidates = list(itertools.product(routings, layouts, _activation(region)))
    return _Block(name, x, end, region, router_nodes, spec_args, candidates)


def _verify_and_rewrite(gm, block: _Block, values, value_of, report) -> fx.Node | None:
    x_val, target = values[block.x], values[block.end]
    if not isinstance(target, torch.Tensor) or x_val.numel() == 0 or target.shape != x_val.shape:
        report.left_alone.append(LeftAlone(block.name, "cannot verify the block on these example inputs"))
        return None
    H = block.spec_args["hidden"]
    spec, nodes = _try_candidates(dict(block.spec_args), block.candidates, x_val.reshape(-1, H),
                                  lambda ns: [value_of[n] for n in block.router_nodes + list(ns)], target.reshape(-1, H))
    if spec is None:
        report.left_alone.append(LeftAlone(block.name, "no routing/expert interpretation reproduced the block's output"))
        return None
    with gm.graph.inserting_before(block.end):
        moe = gm.graph.call_function(MOE, (block.x, [*block.router_nodes, *nodes], spec.to_json()))
    moe.meta.update(block.end.meta)
    block.end.replace_all_uses_with(moe)
    for n in reversed(block.region):
        if not n.users:
            gm.graph.erase_node(n)
    form = "user ModuleList" if spec.experts.layout == "list" else "user 3-D weights"
    report.rewritten.append(BlockEntry(block.name, spec.variant, H, spec.intermediate, spec.num_experts, spec.top_k, form))
    report.counters["capture_user_moe"] += 1
    return moe
