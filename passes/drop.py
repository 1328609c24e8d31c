"""Threshold dropping of (token, expert) pairs: 1T-Drop and 2T-Drop (paper §3, §6). NOT exact by design.

Pattern::

    y = dualsparse.moe(x, params, spec)                       # spec.drop.mode == "none"

Replacement::

    y = dualsparse.moe(x, params, spec')                      # spec'.drop = DropSpec(mode, key, shared_outside)

What it preserves: the routing and the original gating weights of every kept pair (no
renormalisation after dropping, paper §3.2); shared experts are never dropped. With T = 0 (1T) or
T_major = T_minor = 0 (2T) no softmax/sigmoid pair is dropped and the block equals the original;
with T >= 1 (1T) only shared experts remain. Rules, on the normalised score s = w / sum_k w:
1T keeps a pair iff s > T; 2T (on Major/Minor halves, partition P = 2, partial) keeps the major
half iff s >= T_major and the minor half iff s >= T_minor. Thresholds live in ``runtime.state``
(device tensors read on every call: no recompile when they change). Tests: ``tests/test_drop.py``.
"""

from __future__ import annotations

import torch.fx as fx

from dsmoe_compiler.capture.fuse_markers import MOE
from dsmoe_compiler.capture.graph_utils import example_value, source_path
from dsmoe_compiler.codegen.reference import parse_spec, routed_units, shared_units
from dsmoe_compiler.ir import DropSpec, MoESpec
from dsmoe_compiler.runtime import state, thresholds


def _shared_outside(gm: fx.GraphModule, name: str) -> int:
    """Neurons per token of shared experts that sit beside the block in the graph (Qwen2-MoE, DeepSeek)."""
    total = 0
    for node in gm.graph.nodes:
        path = source_path(node) or ""
        if path.startswith(name + ".") and "shared_expert" in path and path.endswith("gate_proj.weight"):
            total += example_value(node).shape[0]
    return total


def _with_halves(spec: MoESpec) -> MoESpec:
    """2T needs Major/Minor halves: partial partition P = 2 (a reconstruct plan makes them importance halves)."""
    if spec.partition == 1 and spec.intermediate % 2 == 0:
        return spec.replace(partition=2, transform="partial")
    if spec.partition != 2 or spec.transform != "partial":
        raise ValueError(f"dualsparse: drop='2t' on block {spec.name!r} needs partition=2 with transform='partial' "
                         f"(got partition={spec.partition}, transform={spec.transform!r})")
    return spec


def _fixed_thresholds(options) -> tuple[float, float]:
    if options.drop == "topk":
        return 0.0, 0.0
    if options.drop in ("1t", "skip"):
        return options.threshold, options.threshold
    if options.t_major is not None:
        return options.t_major, options.t_minor
    return max(options.threshold - options.band, 0.0), options.threshold + options.band


def _fitted_thresholds(specs: list[MoESpec], options) -> dict[str, tuple[float, float]]:
    from dsmoe_compiler.runtime.plan import resolve_plan

    plan = resolve_plan(options.plan)
    layers = {}
    for spec in specs:
        found = plan.layer(spec.name)
        if found is None:
            raise ValueError(f"dualsparse: option 'drop_rate': the plan has no calibration scores for block {spec.name!r}")
        routed = routed_units(spec)  # the shared experts' neurons, folded or beside, cannot drop
        layers[spec.name] = (found[1].scores, routed / (routed + shared_units(spec)))
    return thresholds.fit_thresholds(layers, options.drop_rate, options.drop, options.band, options.threshold_policy)


def drop_pass(gm: fx.GraphModule, options, report) -> bool:
    if options.drop == "none":
        return False
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MOE]
    specs = []
    for node in nodes:
        spec = parse_spec(node.args[2])
        if options.drop == "2t":
            spec = _with_halves(spec)
        outside = 0 if spec.shared is not None else _shared_outside(gm, spec.name)  # folded ones are in spec.shared
        specs.append(spec.replace(drop=DropSpec(mode=options.drop, shared_outside=outside)))
    fitted = _fitted_thresholds(specs, options) if options.drop_rate is not None else {}
    for node, spec in zip(nodes, specs):
        t_major, t_minor = fitted.get(spec.name) or _fixed_thresholds(options)
        device = example_value(node.args[0]).device
        key = state.register(spec.name, t_major, t_minor, device, options.stats)
        spec = spec.replace(drop=DropSpec(mode=options.drop, key=key, shared_outside=spec.drop.shared_outside))
        node.args = (node.args[0], node.args[1], spec.to_json(), *node.args[3:])
        report.counters["drop"] += 1
    return bool(nodes)
