"""Major/Minor expert reconstruction (paper §4.2(a)(b)): reorder each expert's neurons by importance.

Equivalence preserved: an expert computes ``y = W2 · glu(W1 x + b1, W3 x + b3) + b2``, a sum over
its neurons i of ``W2[:, i] * glu_i(x)``; ``glu`` acts neuron by neuron. Permuting the neurons, i.e.
the rows of W1 and W3 (and their biases) and the columns of W2 with the same permutation, permutes
the terms of that sum and leaves y unchanged (up to fp summation order). The router is untouched.
So the model's own forward, and every compiled graph reading these parameters, compute the same
function before and after; tested in ``tests/test_calibrate.py``
(``test_reconstructed_equals_original_*``, ``test_compiled_with_plan_equals_eager``).

What it buys: after reordering by descending importance, sub-expert p of partition P (the neurons
[p*I/P, (p+1)*I/P), ``reference.sub_expert_weights``) is the p-th importance tier; with P = 2,
p = 0 is the Major half and p = 1 the Minor half, which the drop passes treat differently.

In place, no copies: each expert is rewritten in place on the model's own parameters, using one
expert's temporary at a time (``index_select`` then ``copy_``); no view or extra weight tensor stays
behind. Every layout of the transformers experts modules is handled: gate/up concatenated [gate; up]
or interleaved (g0, u0, g1, u1, ...), stored [E, out, in] or transposed [E, in, out], with biases, and experts
without a gate (NemotronH: the rows of ``up_proj``).

Applied once: the order applied is recorded on each parameter tensor as the attribute
``_dualsparse_neuron_order`` ([E, I] int64, position j of expert e holds original neuron
``order[e, j]``). Plans are written in original neuron indices, so applying a plan permutes from
the recorded order to the plan's order: applying the same plan again moves nothing, and applying
another plan afterwards lands on that plan's order, not on a composition. The record lives on the
Python tensor objects: a model re-created from a saved state dict of reconstructed weights has lost
it (apply plans to the original checkpoint's weights). ``module.to(...)`` keeps it.

Entry points: ``reconstruct_(model, plan)`` before compiling, or ``options={"plan": plan_or_path}``,
which runs ``reconstruct`` below as a backend pass on the parameters behind each ``dualsparse.moe``
node (placeholders whose example inputs are the model's parameters) before the partition pass; the
option also makes P default to 2 (``options.py``). Report counter: ``reconstruct`` (blocks checked
against the plan and put in its order), ``reconstruct_experts_moved`` (experts actually permuted).
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from dsmoe_compiler.ir import ACTIVATION_SLOTS, ExpertsSpec
from dsmoe_compiler.runtime.plan import Plan, check_layer_fingerprint, layer_fingerprint, resolve_plan

ORDER_ATTR = "_dualsparse_neuron_order"


def _owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor that keeps the record: a view's base (DBRX's slots are views of its 2-D weights, made per call)."""
    return t if t._base is None else t._base


def applied_order(t: torch.Tensor) -> torch.Tensor | None:
    """The neuron order recorded on a parameter (or the parameter a view looks at) by reconstruction, or None
    (checkpoint order)."""
    return getattr(_owner(t), ORDER_ATTR, None)


def _gate_up_index(perm: torch.Tensor, ex: ExpertsSpec, intermediate: int) -> torch.Tensor:
    """Output channels of the fused gate_up weight that follow a neuron permutation."""
    if ex.interleaved:
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).flatten()
    return torch.cat([perm, perm + intermediate])


def _permute_(w: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """w.index_select(dim, index) written back into w: one temporary of w's size."""
    w.copy_(w.index_select(dim, index))


def permute_experts_(tensors: dict[str, torch.Tensor], ex: ExpertsSpec, target: torch.Tensor) -> int:
    """Put the experts of one fused block in neuron order ``target`` ([E, I], original indices), in place.

    ``tensors`` maps slot names (gate_up, down[, gate_up_bias, down_bias]; experts without a gate: up, down; the
    separate layout: gate, up, down) to the block's parameters, or views of them. Returns how many experts were moved
    (0 when they already are in that order).
    """
    down = tensors["down"]
    # the weights whose rows (columns, transposed) are the neurons: a fused [gate; up] holds two rows a neuron
    neuron_rows = ["gate_up"] if "gate_up" in tensors else [s for s in ("gate", "up") if s in tensors]
    E, I = target.shape
    records = [applied_order(t) for t in tensors.values()]
    if any((r is None) != (records[0] is None) or (r is not None and not torch.equal(r, records[0]))
           for r in records):
        raise ValueError("dualsparse: the parameters of one MoE block carry different recorded neuron orders")
    target = target.to(torch.int64).cpu()
    current = records[0] if records[0] is not None else torch.arange(I).expand(E, I)
    perm = torch.argsort(current, dim=1).gather(1, target)  # perm[e, j]: position now holding target[e, j]
    identity = torch.arange(I)
    moved = 0
    inference = any(t.is_inference() for t in tensors.values())
    with torch.inference_mode() if inference else torch.no_grad():
        for e in range(E):
            if torch.equal(perm[e], identity):
                continue
            p = perm[e].to(down.device)
            rows = _gate_up_index(p, ex, I)
            for slot in neuron_rows:
                _permute_(tensors[slot][e], 1 if ex.transposed else 0, rows if slot == "gate_up" else p)
            _permute_(down[e], 0 if ex.transposed else 1, p)
            if "gate_up_bias" in tensors:
                _permute_(tensors["gate_up_bias"][e], 0, rows)
            moved += 1
    for t in tensors.values():  # the down bias is per output channel: unchanged, but it belongs to the block
        setattr(_owner(t), ORDER_ATTR, target)
    return moved


# ---- before compiling -------------------------------------------------------------------------------
def reconstruct_(model, plan: Plan | str) -> int:
    """Apply a plan to a (transformers) model in place; returns the number of experts moved.

    Checks the plan against the model first (``Plan.check``); afterwards the model computes the same
    function and sub-expert 0 of P=2 of every expert is its Major half.
    """
    from dsmoe_compiler.runtime.calibrate import experts_params, experts_spec, find_experts

    plan = resolve_plan(plan)
    plan.check(model)
    moved = 0
    for name, module, _ in find_experts(model):
        _, layer = plan.layer(name)
        spec = experts_spec(module, name)
        tensors = dict(zip(spec.slots, experts_params(module, spec)))
        moved += permute_experts_(tensors, spec.experts, layer.order)
    return moved


# ---- backend pass -----------------------------------------------------------------------------------
_VIEWS = {"view", "reshape", "transpose", "permute", "t", "unflatten"}


def _view_name(node: fx.Node) -> str | None:
    """The method name of a view op (``x.view(...)``, ``torch.transpose(x, ...)``), else None."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def _real_tensor(gm: fx.GraphModule, node, what: str) -> torch.Tensor:
    """The model tensor behind a graph input (dynamo keeps the real parameter as the placeholder's example)."""
    t = None
    if isinstance(node, fx.Node) and node.op == "placeholder":
        grapharg = node.meta.get("grapharg")
        with contextlib.suppress(Exception):
            t = grapharg.example
    elif isinstance(node, fx.Node) and node.op == "get_attr":
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part)
    elif isinstance(node, fx.Node) and _view_name(node) in _VIEWS and not any(
            isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        # a view of a model tensor with constant sizes (DBRX's [E I, H] weights seen as [E, I, H]): the same view of
        # the real tensor, so that permuting it in place permutes the model's own weights
        t = getattr(_real_tensor(gm, node.args[0], what), _view_name(node))(*node.args[1:], **node.kwargs)
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(t, torch.Tensor) or isinstance(t, FakeTensor):
        raise ValueError(f"dualsparse: option 'plan': cannot reach the model tensor behind {what}; "
                         f"apply the plan before compiling with dsmoe_compiler.passes.reconstruct.reconstruct_")
    return t


def reconstruct(gm: fx.GraphModule, options, report) -> bool:
    """Backend pass for ``options["plan"]``: reorder the neurons of every MoE block's parameters in place.

    The graph itself is unchanged (returns False); the parameters it reads are permuted.
    """
    from dsmoe_compiler.capture.fuse_markers import MOE
    from dsmoe_compiler.codegen.reference import parse_spec

    if getattr(options, "plan", None) is None:
        return False
    plan = resolve_plan(options.plan)
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target is MOE):
            continue
        spec = parse_spec(node.args[2])
        if spec.experts.local_experts:  # a plan is per global expert: permuting local weights would misplace it
            raise ValueError(f"dualsparse: option 'plan': block {spec.name!r} is sharded (shard_experts_); "
                             "apply the plan with reconstruct_(model, plan) before sharding")
        if spec.experts.layout == "list":
            raise ValueError(f"dualsparse: option 'plan': block {spec.name!r} has one module per expert; "
                             f"reconstruction supports 3-D expert weights only")
        hit = plan.layer(spec.name)
        if hit is None:
            raise ValueError(f"dualsparse: option 'plan': the plan has no layer for MoE block {spec.name!r} "
                             f"(plan layers: {sorted(plan.layers)[:4]}...)")
        plan_name, layer = hit
        tensors = {s: _real_tensor(gm, p, f"{spec.name}:{s}") for s, p in zip(spec.slots, node.args[1])
                   if s not in ACTIVATION_SLOTS}  # a router input or a given routing: activations, not the model's
        planned, actual = layer.fingerprint, layer_fingerprint(spec, tensors.get("router_weight"))
        if spec.routing.score_func == "given":  # the operator holds no router to compare: the experts' facts must do
            planned, actual = ({k: v for k, v in fp.items() if k != "router_sketch"} for fp in (planned, actual))
        check_layer_fingerprint(spec.name, planned, actual)
        experts_tensors = {s: tensors[s] for s in ("gate_up", "gate", "up", "down", "gate_up_bias", "down_bias")
                           if s in tensors}
        report.counters["reconstruct_experts_moved"] += permute_experts_(experts_tensors, spec.experts, layer.order)
        report.counters["reconstruct"] += 1
    return False
