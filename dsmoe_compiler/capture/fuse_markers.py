"""Fuse each transformers route/experts marker pair into one ``dualsparse.moe`` node.

Pattern (what ``capture/transformers_hf.py`` leaves in the graph)::

    r = dualsparse.route(x_r, router_params, route_spec)
    y = dualsparse.experts(x, r[2], r[1], expert_params, experts_spec)

Replacement::

    y = dualsparse.moe(x, router_params + expert_params, merged_spec)       # x_r is x up to views
    y = dualsparse.moe(x, router_params + [x_r] + expert_params, merged_spec)  # otherwise: slot router_input

Equivalence: ``reference.moe = reference.experts(x, *reference.route(x_r)[2:0:-1])`` (``router_logits`` reads
the router_input slot where there is one), so the rewrite is exact by construction (tested on every transformers
architecture).

An experts marker whose ids and weights do not come straight from a route marker (a router written as ops that
``route_graph`` could not read, or routing outputs changed on their way) takes the graph's routing as it is::

    y = dualsparse.moe(x, [index, weights] + expert_params, spec)   # spec.routing.score_func == "given"

exact by construction as well (``reference.route`` hands the two slots to ``reference.experts`` unchanged); the
routing ops stay in the graph for the inner compiler. Tests: ``tests/test_capture_route_graph.py``.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.capture.graph_utils import block_name, example_value, same_base
from dsmoe_compiler.ir import RoutingSpec
from dsmoe_compiler.report import BlockEntry, LeftAlone, Report

ROUTE = torch.ops.dualsparse.route.default
EXPERTS = torch.ops.dualsparse.experts.default
MOE = torch.ops.dualsparse.moe.default
LEFT_ALONE = torch.ops.dualsparse.left_alone.default
ROUTE_REASON = "dualsparse_route_reason"
"""Meta key of an experts node whose router ``route_graph`` could not read: why (logged with the block)."""
log = logging.getLogger("dsmoe_compiler")


def _is(node: fx.Node, target) -> bool:
    return node.op == "call_function" and node.target in (target, getattr(target, "_overloadpacket", None))


def _route_output(node: fx.Node, index: int) -> fx.Node | None:
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == index:
        src = node.args[0]
        if isinstance(src, fx.Node) and _is(src, ROUTE):
            return src
    return None


def collect_left_alone(gm: fx.GraphModule, report: Report) -> None:
    """Report and remove the ``left_alone`` identity markers."""
    for node in list(gm.graph.nodes):
        if _is(node, LEFT_ALONE):
            x, reason = node.args
            report.left_alone.append(LeftAlone(block_name(node) or node.name, reason))
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)


def fuse_markers(gm: fx.GraphModule, report: Report) -> list[fx.Node]:
    """Replace route/experts pairs by moe nodes; returns the new nodes."""
    fused = []
    for node in list(gm.graph.nodes):
        if not _is(node, EXPERTS):
            continue
        x, index, weights, expert_params, experts_json = node.args
        route = _route_output(index, 2)
        e = parse_spec(experts_json)
        # a router over more ids than the experts (LongCat-Flash's zero-computation experts) is not the experts' own
        if (route is None or _route_output(weights, 1) is not route or e.routing.absent_ids
                or parse_spec(route.args[2]).num_experts != e.num_experts):
            fused.append(_given_routing(gm, node, report))
            continue
        route_params, route_json = list(route.args[1]), route.args[2]
        r = parse_spec(route_json)
        route_slots = r.slots
        if not same_base(route.args[0], x):  # the router reads a tensor of its own (Gemma-4): one more input
            route_params.append(route.args[0])
            route_slots += ("router_input",)
        name = block_name(node) or node.name
        spec = e.replace(name=name, routing=r.routing, slots=route_slots + e.slots)
        with gm.graph.inserting_before(node):
            moe = gm.graph.call_function(MOE, (x, [*route_params, *expert_params], spec.to_json()))
        moe.meta.update(node.meta)
        node.replace_all_uses_with(moe)
        gm.graph.erase_node(node)
        for user in list(route.users):
            if not user.users:
                gm.graph.erase_node(user)
        if not route.users:
            gm.graph.erase_node(route)
        _report(report, spec, "fuse_markers")
        fused.append(moe)
    return fused


def _given_routing(gm: fx.GraphModule, node: fx.Node, report: Report) -> fx.Node:
    """One ``moe`` node for an experts marker fed by routing ops of the graph: its ids and weights become slots."""
    x, index, weights, expert_params, experts_json = node.args
    e = parse_spec(experts_json)
    value = example_value(weights)
    routing = RoutingSpec(score_func="given", weights_fp32=value is not None and value.dtype == torch.float32,
                          absent_ids=e.routing.absent_ids)  # the experts marker says whether ids may name no expert
    spec = e.replace(name=block_name(node) or node.name, routing=routing, slots=("topk_index", "topk_weights") + e.slots)
    with gm.graph.inserting_before(node):
        moe = gm.graph.call_function(MOE, (x, [index, weights, *expert_params], spec.to_json()))
    moe.meta.update(node.meta)
    node.replace_all_uses_with(moe)
    gm.graph.erase_node(node)
    why = node.meta.get(ROUTE_REASON)  # set by route_graph: where its router pattern stopped
    log.info("dualsparse: %s takes the routing its graph computes%s", spec.name, f" ({why})" if why else "")
    _report(report, spec, "given_routing")
    return moe


def _report(report: Report, spec, counter: str) -> None:
    report.rewritten.append(BlockEntry(spec.name, spec.variant, spec.hidden, spec.intermediate, spec.num_experts,
                                       spec.top_k, "transformers"))
    report.counters[counter] += 1
