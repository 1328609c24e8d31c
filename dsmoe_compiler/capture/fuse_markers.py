"""Fuse each transformers route/experts marker pair into one ``dualsparse.moe`` node.

Pattern (what ``capture/transformers_hf.py`` leaves in the graph)::

    r = dualsparse.route(x_r, router_params, route_spec)
    y = dualsparse.experts(x, r[2], r[1], expert_params, experts_spec)

Replacement::

    y = dualsparse.moe(x, router_params + expert_params, merged_spec)       # x_r is x up to views
    y = dualsparse.moe(x, router_params + [x_r] + expert_params, merged_spec)  # otherwise: slot router_input

Equivalence: ``reference.moe = reference.experts(x, *reference.route(x_r)[2:0:-1])`` (``router_logits`` reads
the router_input slot where there is one), so the rewrite is exact by construction (tested on every transformers
architecture). A pair whose routing outputs pass
through other ops on their way to the experts is not fused; both markers stay and remain exact.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.capture.graph_utils import block_name, same_base
from dsmoe_compiler.report import BlockEntry, LeftAlone, Report

ROUTE = torch.ops.dualsparse.route.default
EXPERTS = torch.ops.dualsparse.experts.default
MOE = torch.ops.dualsparse.moe.default
LEFT_ALONE = torch.ops.dualsparse.left_alone.default
ROUTE_REASON = "dualsparse_route_reason"
"""Meta key of an experts node whose router ``route_graph`` could not read: why (reported with the block)."""


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
        if route is None or _route_output(weights, 1) is not route:
            why = node.meta.get(ROUTE_REASON)  # set by route_graph: where its router pattern stopped
            report.left_alone.append(LeftAlone(block_name(node) or node.name, "routing reaches the experts through "
                                               f"other ops{f' ({why})' if why else ''}; markers kept (exact)"))
            continue
        route_params, route_json = list(route.args[1]), route.args[2]
        r, e = parse_spec(route_json), parse_spec(experts_json)
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
        report.rewritten.append(BlockEntry(name, spec.variant, spec.hidden, spec.intermediate, spec.num_experts,
                                           spec.top_k, "transformers"))
        report.counters["fuse_markers"] += 1
        fused.append(moe)
    return fused
