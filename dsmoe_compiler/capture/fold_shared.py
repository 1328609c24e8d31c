"""Fold always-active shared experts (Qwen2-MoE, DeepSeek) into the ``dualsparse.moe`` node beside them.

Pattern::

    y = dualsparse.moe(x, params, spec)                         # spec.shared is None
    s = down(act(gate(x)) * up(x))        [* sigmoid(x @ w_g.T)] # plain ops on the same x
    out = y(.view) + s

Replacement::

    out = dualsparse.moe(x, params + [gate, up, down(, w_g)], spec')   # spec'.shared = SharedSpec(...)

Equivalence: ``reference.moe`` adds ``reference.shared_experts`` to the routed output, the same sum.
The shared weights are found by their parameter names (``shared_expert(s).gate_proj/up_proj/down_proj``,
``shared_expert_gate``) and the other operand may hold no op but those of that MLP (``_PLAIN_MLP_OPS``: linear,
SiLU, products, the gate's sigmoid, views and casts), so that an op the example inputs leave idle cannot pass unseen.
DeepSeek-V4's clamps are read off the ops (``_clamp``): the gate projection's output clamped to at most L and fed to
the SiLU, the up projection's to [-L, L], nothing else (``SharedSpec.clamp``, ``limit``). A fold is accepted only if
the reference then reproduces ``out`` on the graph's own example inputs (rtol 1e-4), otherwise the block keeps its
shared experts as plain ops (exact either way). Tests: ``tests/test_capture_hf.py`` (Qwen2-MoE, DeepSeek-V2/V3 report
"shared"), ``tests/test_capture_given.py`` (DeepSeek-V4's clamps: read off the ops, or not folded).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from dsmoe_compiler.capture.fuse_markers import MOE
from dsmoe_compiler.capture.graph_utils import (CASTS, LINEARS, VIEWS, example_value, is_call, recorded_values,
                                                region_between, source_path, strip, strip_views)
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.ir import SharedSpec

_ADDS = (operator.add, torch.add)
_ROLES = {"gate_proj.weight": "shared_gate", "up_proj.weight": "shared_up", "down_proj.weight": "shared_down"}


def _add_after(moe: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(add node, its other operand) where the moe output, maybe through views, is added to something."""
    node = moe
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_function" and user.target in _ADDS and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            return (user, other) if isinstance(other, fx.Node) else None
        if user.op != "call_method" or user.target not in ("view", "reshape"):
            return None
        node = user
    return None


_PLAIN_MLP_OPS = (*LINEARS, F.silu, torch.sigmoid, F.sigmoid, operator.mul, torch.mul)


_CLAMPS = (torch.clamp, torch.clamp_max, torch.clamp_min)


def _plain_mlp(region: list[fx.Node]) -> bool:
    """Every op of ``region`` is one of the SwiGLU MLP's (``SharedSpec``: SiLU, optional sigmoid gate, clamps)."""
    return all(n.op in ("placeholder", "get_attr") or is_call(n, _PLAIN_MLP_OPS + _CLAMPS, CASTS | VIEWS | {"clamp"})
               for n in region)


def _clamp_bounds(node: fx.Node) -> tuple | None:
    """(min, max) of a clamp call with constant bounds, else None."""
    if node.op == "call_function" and node.target in (torch.clamp_max, torch.clamp_min):
        bound = node.args[1] if len(node.args) > 1 else None
        return (None, bound) if node.target is torch.clamp_max else (bound, None)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return None if isinstance(lo, fx.Node) or isinstance(hi, fx.Node) else (lo, hi)


def _projection(node, params: dict[str, fx.Node]) -> str | None:
    """The role (shared_gate, shared_up) of the linear that ``node`` is, up to casts and views; else None."""
    node = strip(node, CASTS | VIEWS)
    if not is_call(node, LINEARS):
        return None
    weight = strip(node.args[1], CASTS | VIEWS)
    return next((role for role, p in params.items() if p is weight), None)


def _clamp(region: list[fx.Node], params: dict[str, fx.Node]) -> tuple[str, float] | None:
    """("none", 7.0) without clamps; ("before", L) for DeepSeek-V4's: the gate projection clamped to at most L and
    read by the SiLU alone, the up projection clamped to [-L, L]; None for any other clamp."""
    clamps = [n for n in region if is_call(n, _CLAMPS, ("clamp",))]
    if not clamps:
        return "none", 7.0
    if len(clamps) != 2:
        return None
    found = {}
    for node in clamps:
        role, bounds = _projection(node.args[0], params), _clamp_bounds(node)
        if role is None or bounds is None or role in found:
            return None
        found[role] = (bounds, node)
    if set(found) != {"shared_gate", "shared_up"}:
        return None
    (g_lo, limit), gate = found["shared_gate"]
    (u_lo, u_hi), _ = found["shared_up"]
    readers = list(gate.users)
    if (g_lo is not None or not isinstance(limit, (int, float)) or u_lo != -limit or u_hi != limit
            or len(readers) != 1 or not is_call(readers[0], (F.silu,))):
        return None
    return "before", float(limit)


def _shared_params(region: list[fx.Node], block: str) -> dict[str, fx.Node] | None:
    found: dict[str, fx.Node] = {}
    for node in dict.fromkeys(a for n in region for a in n.all_input_nodes if a.op == "placeholder"):
        path = source_path(node) or ""
        if not path.startswith(block + ".") or "shared_expert" not in path:
            return None  # something else feeds the other operand: not a plain shared expert
        if path.endswith("shared_expert_gate.weight"):
            found["shared_gate_weight"] = node
            continue
        role = next((r for suffix, r in _ROLES.items() if path.endswith(suffix)), None)
        if role is None:
            return None
        found[role] = node
    return found if {"shared_gate", "shared_up", "shared_down"} <= set(found) else None


def fold_shared_experts(gm: fx.GraphModule, example_inputs, report) -> int:
    candidates = []
    for moe in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MOE]:
        spec = parse_spec(moe.args[2])
        found = _add_after(moe) if spec.shared is None else None
        if found is None:
            continue
        add, other = found
        base = strip_views(moe.args[0])
        region = region_between(other, base)
        params = _shared_params(region, spec.name)
        clamp = _clamp(region, params) if params is not None and _plain_mlp(region) else None
        if clamp is not None:
            candidates.append((moe, add, base, spec, params, region, clamp))
    if not candidates:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value_of = dict(zip(placeholders, example_inputs))
    # x, the sum, and any operand the graph computes (a given routing's ids and weights)
    wanted = {n for c in candidates for n in (c[0].args[0], c[1], *c[0].args[1]) if n.op != "placeholder"}
    values = recorded_values(gm, example_inputs, wanted)
    folded = 0
    for moe, add, base, spec, params, region, (clamp, limit) in candidates:
        x_in = moe.args[0] if example_value(moe.args[0]).shape == example_value(add).shape else base
        if getattr(example_value(x_in), "shape", None) != example_value(add).shape:
            continue
        names = ["shared_gate", "shared_up", "shared_down"] + (["shared_gate_weight"] if "shared_gate_weight" in params else [])
        inter = example_value(params["shared_gate"]).shape[0]
        new_spec = spec.replace(shared=SharedSpec(intermediate=inter, gated="shared_gate_weight" in params,
                                                  clamp=clamp, limit=limit), slots=spec.slots + tuple(names))
        new_params = [*moe.args[1], *(params[n] for n in names)]
        x_val = values[moe.args[0]]
        got = reference.moe(x_val.reshape(-1, spec.hidden), [value_of.get(p, values.get(p)) for p in new_params],
                            new_spec)
        want = values[add].reshape(-1, spec.hidden)
        if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5 * (1 + want.abs().max().item())):
            continue
        with gm.graph.inserting_before(add):
            fused = gm.graph.call_function(MOE, (x_in, new_params, new_spec.to_json(), *moe.args[3:]))
        fused.meta.update(add.meta)
        add.replace_all_uses_with(fused)
        dead = [n for n in gm.graph.nodes if n is add or n is moe or n in set(region) or _is_view_of(n, moe)]
        gm.graph.erase_node(add)
        _erase_unused(gm, dead)
        folded += 1
    report.counters["fold_shared"] += folded
    return folded


def _is_view_of(node: fx.Node, moe: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("view", "reshape") and strip_views(node) is moe


def _erase_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the given nodes that nothing uses any more, last first (none of them mutates anything)."""
    for node in reversed(nodes):
        if not getattr(node, "_erased", False) and not node.users:
            gm.graph.erase_node(node)
