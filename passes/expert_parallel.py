"""Expert parallelism: route (+ drop) -> dispatch all_to_all -> local experts -> combine all_to_all (paper §3.3, §4.3).

Pattern (a block after partition and drop)::

    y = dualsparse.moe(x, params, spec, impl)

Replacement (``runtime/ep.py`` documents each step)::

    send, row, weight, counts, sizes = dualsparse.ep_route(x, params, spec, ep, impl)
    send_splits, recv_splits = ep.splits(sizes, ep)                        # NOTE: host sync
    sent = ep.sent_rows(send, send_splits)                 # the first sum(send_splits) rows (a view)
    recv = _c10d_functional.wait_tensor(_c10d_functional.all_to_all_single(sent, recv_splits, send_splits, group))
    y_local = dualsparse.ep_experts(recv, counts, params, spec, ep, impl)
    pending = _c10d_functional.all_to_all_single(y_local, send_splits, recv_splits, group)
    shared = dualsparse.ep_shared(x, params, spec)          # with shared experts: overlaps the combine exchange
    back = _c10d_functional.wait_tensor(pending)
    y = dualsparse.ep_combine(x, back, row, weight, params, spec, ep, impl, shared)

Setting: per-rank tokens (each rank runs the compiled model on its own share of the batch, the
usual EP); rank r computes the contiguous sub-experts ``dist.expert_ranges(E*P, W)[r:r+2]``, so
after a partial transformation E*P sub-experts spread over up to E*P ranks (S-ETP). Every rank
keeps its parameters as graph inputs and reads only its local sub-experts (views): the whole
model's, or only the experts overlapping its range after ``dist.shard_experts_`` (the spec then
records the global E and the offset; ``ep.local_spec`` maps global sub-expert ids to local weights).
A sharded model compiled without this option is refused (``ops.refuse_sharded``).

Equivalence preserved: on each rank, y equals ``dualsparse.moe(x, params, spec)`` on that rank's
x: dropping off, up to the summation order (each pair's expert output is computed unweighted on its
owner, shipped back, and weighted and summed on the token's rank in fp32 like the reference);
dropping on with uniform thresholds, the same pairs are kept (``keep_per_destination`` equals
``reference.keep_mask``). With a load-aware policy (``runtime/load_aware.py``) each pair is judged
with its destination rank's thresholds. Dropped pairs are removed before the dispatch. A block that weights
the expert *input* (Llama-4's ``weight_on_input``) sends each row already scaled by its pair's weight, and its
combine only sums. With P = 2 (partial) a (token, slot) is sent once per rank with the neuron halves it kept
(``EPSpec.nested``), which sums the same sub-expert outputs. Tests: ``tests/test_expert_parallel.py`` (gloo, 2
and 4 processes). """

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from dsmoe_compiler.capture.graph_utils import example_value
from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.runtime import dist as ds_dist
from dsmoe_compiler.runtime import ep

MOE = torch.ops.dualsparse.moe.default
EXPERTS = torch.ops.dualsparse.experts.default
A2A = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


def _impl(options, node) -> str:
    if len(node.args) > 3 and node.args[3] != "reference":
        return node.args[3]
    x = example_value(node.args[0])
    return options.kernel_impl(x is not None and x.is_cuda)


def _refuse_sharded(gm: fx.GraphModule, targets) -> None:
    """A model sharded by ``dist.shard_experts_`` holds only its rank's experts: outside the EP operators (no EP,
    or an experts marker left unfused) the answer would be wrong, so compiling fails."""
    from dsmoe_compiler.ops import refuse_sharded

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            refuse_sharded(parse_spec(node.args[2] if node.target is MOE else node.args[4]))


def expert_parallel_pass(gm: fx.GraphModule, options, report) -> bool:
    if not getattr(options, "expert_parallel", False):
        _refuse_sharded(gm, (MOE, EXPERTS))
        return False
    _refuse_sharded(gm, (EXPERTS,))
    group = ds_dist.resolve_group(options.expert_parallel)
    name = ds_dist.group_name(group)
    graph = gm.graph
    changed = False
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is MOE]:
        x, params, spec_json = node.args[:3]
        spec = parse_spec(spec_json)
        ep_spec = ep.ep_spec_for(spec, group, stats=bool(options.stats))
        ep.check_local_weights(spec, ep_spec)  # a sharded model must hold this rank's sub-experts
        ep_json = ep_spec.to_json()
        impl = _impl(options, node)
        with graph.inserting_before(node):
            routed = graph.call_function(torch.ops.dualsparse.ep_route.default, (x, params, spec_json, ep_json, impl))
            send, row, weight, counts, sizes = (graph.call_function(operator.getitem, (routed, i)) for i in range(5))
            sizes = graph.call_function(ep.splits, (sizes, ep_json))
            send_splits, recv_splits = (graph.call_function(operator.getitem, (sizes, i)) for i in range(2))
            sent = graph.call_function(ep.sent_rows, (send, send_splits))
            recv = graph.call_function(WAIT, (graph.call_function(A2A, (sent, recv_splits, send_splits, name)),))
            local = graph.call_function(torch.ops.dualsparse.ep_experts.default,
                                        (recv, counts, params, spec_json, ep_json, impl))
            pending = graph.call_function(A2A, (local, send_splits, recv_splits, name))
            shared_op = (torch.ops.dualsparse.ep_shared.default, (x, params, spec_json))
            shared = None  # the shared experts need no exchange: they run while the combine exchange is in flight
            if spec.shared is not None and ep.SHARED_OVERLAP:
                shared = graph.call_function(*shared_op)
            back = graph.call_function(WAIT, (pending,))
            if spec.shared is not None and not ep.SHARED_OVERLAP:
                shared = graph.call_function(*shared_op)
            out = graph.call_function(torch.ops.dualsparse.ep_combine.default,
                                      (x, back, row, weight, params, spec_json, ep_json, impl, shared))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        report.counters["expert_parallel"] += 1
        changed = True
    return changed
