"""Expert-parallel MoE operators: route (+ drop) -> dispatch -> local experts -> combine, per-rank tokens.

Setting: the usual EP. Each rank of the group runs the model on its *own* tokens (its share of the
batch); rank r holds the contiguous sub-experts ``ranges[r] .. ranges[r+1] - 1`` of the E*P
sub-experts (S-ETP after a partial transformation: sub-expert s = e*P + p). Data-replicated
routing is the special case where every rank passes the same x (each rank then gets the full
output; the experts still run once per (token, pair, rank)).

The graph the EP pass (``passes/expert_parallel.py``) builds from one ``dualsparse.moe`` node::

    send, row, weight, counts, sizes = dualsparse.ep_route(x, params, spec, ep, impl)  # route, drop, group
    send_splits, recv_splits = ep_splits(sizes, ep)                          # NOTE: host sync (.tolist())
    recv = all_to_all_single(send[:sum(send_splits)], recv_splits, send_splits, group)  # dispatch (functional)
    y = dualsparse.ep_experts(recv, counts, params, spec, ep, impl)           # local sub-experts, unweighted
    pending = all_to_all_single(y, send_splits, recv_splits, group)          # combine, in flight while
    shared = dualsparse.ep_shared(x, params, spec)                           # the shared experts run (if any)
    out = dualsparse.ep_combine(x, wait(pending), row, weight, params, spec, ep, impl, shared)  # weighted sum

``row`` [T, K'] says where each (token, slot) comes back: its row of ``back`` (the send order), or -1 when
it was dropped; ``weight`` [T, K'] is its routing weight. The combine gathers, weights and sums those rows
in fp32 (``codegen/gather_combine.py`` on the GPU). Host synchronisations per block: the split sizes (one
``.tolist()``), dropping or not: ``send`` has room for every pair, and the exchange sends its first
sum(send_splits) rows (``sent_rows``).

Semantics: equal to ``reference.moe`` on each rank's x (dropping off: up to the summation order;
dropping on: with uniform thresholds, the same kept pairs as ``reference.keep_mask``). A dropped
pair is removed in ``ep_route``, before the dispatch: it is neither sent nor computed.

``counts`` is every rank's per-sub-expert number of kept pairs ([W, E*P], all-gathered inside
``ep_route``); from it each rank knows what it sends, what it receives, and in which order the
received rows are (by source rank, then by local sub-expert). With a load-aware policy
(``runtime/load_aware.py``) each rank's pairs per destination before dropping are all-gathered first, and
the policy picks each destination rank's thresholds from them.

Weights: ``params`` hold all E experts, or, on a model sharded by ``dist.shard_experts_``, only the
experts overlapping this rank's sub-experts (``spec.experts.expert_offset`` / ``local_experts``;
``local_spec`` maps a global sub-expert id to the held weights). The router and shared experts are
always whole.

Statistics (``options={"stats": True}``): per block, loads before / after dropping of every rank,
and this rank's time in compute vs communication (host clock on CPU; CUDA events on GPU, read
back only by ``ep_stats()``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from dsmoe_compiler.codegen import reference
from dsmoe_compiler.codegen.gather_combine import gather_combine, gather_combine_reference
from dsmoe_compiler.codegen.launch import INTERPRETED, KERNEL_DTYPES
from dsmoe_compiler.codegen.received_rows import halves_of_class, received_rows_reference
from dsmoe_compiler.codegen.reference import parse_spec
from dsmoe_compiler.ir import DropSpec, MoESpec
from dsmoe_compiler.runtime import dist as ds_dist
from dsmoe_compiler.runtime import load_aware, state


@dataclass(frozen=True)
class EPSpec:
    group: str
    """Process group name (``ProcessGroup.group_name``)."""
    rank: int
    """This rank's index in the group."""
    world: int
    ranges: tuple[int, ...]
    """Sub-expert boundaries: rank r holds ranges[r] .. ranges[r+1] - 1."""
    key: str
    """Name of the block's EP statistics in ``_STATS``."""
    stats: bool = False
    nested: bool = False
    """P = 2 partial transformation: rows travel as (token, slot, rank) units that carry both neuron halves
    when one rank holds both, in groups g = 3 e + c (c: 0 Major half only, 1 both, 2 Minor half only,
    ``align.py``'s nested order); otherwise one row per kept (token, sub-expert) pair, grouped by sub-expert."""

    @property
    def lo(self) -> int:
        return self.ranges[self.rank]

    @property
    def hi(self) -> int:
        return self.ranges[self.rank + 1]

    @functools.cached_property
    def group_ranges(self) -> tuple[int, ...]:
        """Row-group boundaries of the ranks: the sub-expert ranges, or with ``nested`` their image in groups
        3 e + c (a boundary inside expert e, after its Major half, leaves the Minor-only group to the next rank)."""
        if not self.nested:
            return self.ranges
        return tuple(b // 2 * 3 + (2 if b % 2 else 0) for b in self.ranges)

    @functools.cached_property
    def groups(self) -> int:
        return self.group_ranges[-1]

    @functools.cached_property
    def splits_experts(self) -> bool:
        """Some expert's two halves sit on two ranks (a rank boundary after a Major half)."""
        return self.nested and any(b % 2 for b in self.ranges)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def ep_spec_for(spec: MoESpec, group=None, stats: bool = False) -> EPSpec:
    """The EP description of ``spec`` on this rank of ``group`` (default: the default group), as the pass makes it."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return EPSpec(group=ds_dist.group_name(group), rank=rank, world=world,
                  ranges=tuple(ds_dist.expert_ranges(spec.num_experts * spec.partition, world)),
                  key=register(spec.name, rank), stats=stats,
                  nested=NESTED_UNITS and spec.partition == 2 and spec.transform == "partial")


FUSED = os.environ.get("DSMOE_EP_FUSED", "on") != "off"
"""With impl "triton": the routing and dropping by the route kernel (a policy's per-destination thresholds by
``dispatch.keep_per_destination``), nested units by ``dispatch.nested_units``, the send order by
``dispatch.group_rows`` and the received rows' labels by ``dispatch.received_rows``, instead of torch ops;
"off" keeps the torch ops (for comparisons)."""

READ_ROW_COUNT = os.environ.get("DSMOE_EP_READ_ROW_COUNT", "off") == "on"
"""Read the number of rows sent on the host, as the route did before its send buffer had room for every pair
(a host sync with dropping; only to time that sync: ``benchmarks/ep_nccl.py --ab-sync``)."""

SHARED_OVERLAP = os.environ.get("DSMOE_EP_SHARED_OVERLAP", "on") != "off"
"""The shared experts run between the combine all_to_all and its wait, overlapping the exchange; "off" runs
them after the wait (for comparisons: ``benchmarks/ep_nccl.py --ab-shared``)."""

DEVICE_POLICY = os.environ.get("DSMOE_EP_DEVICE_POLICY", "on") != "off"
"""With the fused path, load-aware dropping under a built-in policy counts each destination's pairs and turns
the gathered loads into thresholds by two launches (``codegen/load_policy.py``) instead of ~15 torch ops; "off"
keeps the ops (for comparisons: ``benchmarks/ep_nccl.py --ab-policy``)."""

SIZES_KERNEL = os.environ.get("DSMOE_EP_SIZES_KERNEL", "on") != "off"
"""With the fused path, the exchange sizes by one launch (``codegen/exchange_sizes.py``); "off": by torch ops (for
comparisons: ``benchmarks/ep_nccl.py --ab-sizes``)."""

NESTED_UNITS = os.environ.get("DSMOE_EP_NESTED", "on") != "off"
"""P = 2 partial: send a (token, slot) once per rank with the halves it kept (``EPSpec.nested``); "off" sends it
once per sub-expert (for comparisons)."""


@functools.lru_cache(maxsize=None)
def parse_ep(text: str) -> EPSpec:
    d = json.loads(text)
    d["ranges"] = tuple(d["ranges"])
    return EPSpec(**d)


# ---- statistics ---------------------------------------------------------------------------------
@dataclass
class EPStats:
    name: str
    rank: int
    calls: int = 0
    load_pre: torch.Tensor | None = None
    """[W] pairs routed to each rank (all ranks' tokens), summed over calls, before dropping."""
    load_post: torch.Tensor | None = None
    """[W] the same after dropping."""
    max_post: torch.Tensor | None = None
    """Sum over calls of the maximum per-rank load after dropping (the straggler's load)."""
    last_pre: torch.Tensor | None = None
    last_post: torch.Tensor | None = None
    compute_s: float = 0.0
    comm_s: float = 0.0
    marks: list = field(default_factory=list)
    """CUDA events of calls not yet folded into compute_s/comm_s: (kind, start, end)."""
    _t: dict = field(default_factory=dict)

    def add_loads(self, pre: torch.Tensor, post: torch.Tensor) -> None:
        pre, post = pre.double(), post.double()
        if self.load_pre is None:
            self.load_pre, self.load_post, self.max_post = torch.zeros_like(pre), torch.zeros_like(post), post.new_zeros(())
        self.load_pre += pre
        self.load_post += post
        self.max_post += post.max()
        self.last_pre, self.last_post = pre, post
        self.calls += 1


_STATS: dict[str, EPStats] = {}


_ids = itertools.count()


def register(name: str, rank: int) -> str:
    key = f"{name}#ep{next(_ids)}"
    _STATS[key] = EPStats(name=name, rank=rank)
    return key


class _Clock:
    """Section timer: host clock on CPU, CUDA events on GPU (no synchronisation until ep_stats())."""

    def __init__(self, ep: EPSpec, device: torch.device):
        self.stats = _STATS.get(ep.key) if ep.stats else None
        self.cuda = device.type == "cuda"

    def mark(self, name: str):
        if self.stats is None:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stats._t[name] = event
        else:
            self.stats._t[name] = time.perf_counter()

    def span(self, kind: str, start: str, end: str):
        if self.stats is None or start not in self.stats._t or end not in self.stats._t:
            return
        a, b = self.stats._t[start], self.stats._t[end]
        if self.cuda:
            self.stats.marks.append((kind, a, b))
        elif kind == "compute":
            self.stats.compute_s += b - a
        else:
            self.stats.comm_s += b - a


def ep_stats() -> dict[str, dict]:
    """Per block: calls, loads of every rank before/after dropping (summed), drop rate per rank, mean
    straggler load after dropping, and this rank's seconds in compute vs communication."""
    out = {}
    for stats in _STATS.values():
        if stats.marks:
            torch.cuda.synchronize()
            for kind, a, b in stats.marks:
                seconds = a.elapsed_time(b) / 1e3
                if kind == "compute":
                    stats.compute_s += seconds
                else:
                    stats.comm_s += seconds
            stats.marks.clear()
        if stats.load_pre is None:
            continue
        pre, post = stats.load_pre.tolist(), stats.load_post.tolist()
        out[stats.name] = {
            "rank": stats.rank, "calls": stats.calls, "load_before": pre, "load_after": post,
            "drop_rate": [1 - b / a if a else 0.0 for a, b in zip(pre, post)],
            "total_drop_rate": 1 - sum(post) / sum(pre) if sum(pre) else 0.0,
            "max_load_after_per_call": stats.max_post.item() / stats.calls,
            "last_load_before": stats.last_pre.tolist(), "last_load_after": stats.last_post.tolist(),
            "compute_s": stats.compute_s, "comm_s": stats.comm_s,
        }
    return out


def reset_ep_stats() -> None:
    for key, stats in list(_STATS.items()):
        _STATS[key] = EPStats(name=stats.name, rank=stats.rank)


def clear() -> None:
    _STATS.clear()
    _CHECKED.clear()


# ---- dropping with per-destination thresholds ---------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _rank_of(bounds: tuple[int, ...], device) -> torch.Tensor:
    """[bounds[-1]] rank of each id under contiguous boundaries (cached: no host-to-device copy per call)."""
    b = torch.tensor(bounds, device=device)
    return torch.bucketize(torch.arange(bounds[-1], device=device), b[1:], right=True)


def owners(ep: EPSpec, device) -> torch.Tensor:
    """[E*P] rank of each sub-expert."""
    return _rank_of(ep.ranges, torch.device(device))


def keep_per_destination(weights: torch.Tensor, index: torch.Tensor, spec: MoESpec,
                         thresholds: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Kept pairs [T, K'] (index already partial-transformed) when pair slot j going to rank d is judged with
    thresholds[d] ([W, 2]). With the same row for every rank this is ``reference.keep_mask``."""
    mode = spec.drop.mode
    if mode == "topk":
        return reference.keep_mask(weights, spec, thresholds[0])
    score = reference.normalized_scores(weights)
    best = score.max(dim=-1, keepdim=True).values
    if spec.transform == "partial" and spec.partition > 1:
        k = score.shape[1]
        score = score.repeat(1, spec.partition)
        part = torch.arange(score.shape[1], device=score.device) // k  # sub-expert p of the slot
    else:
        part = torch.zeros(score.shape[1], dtype=torch.long, device=score.device)
    dest = owner[index]
    column = part.expand_as(dest) if mode == "2t" else torch.zeros_like(dest)
    thr = thresholds[dest, column]
    if mode == "2t":
        return score >= thr
    if mode == "1t":
        return score > thr
    return score >= thr * best  # skip


# ---- local weights (a model sharded by dist.shard_experts_) -----------------------------------------------
def check_local_weights(spec: MoESpec, ep: EPSpec) -> None:
    """Raise unless the block's weights hold every expert overlapping this rank's sub-experts ep.lo .. ep.hi - 1."""
    ex, P = spec.experts, spec.partition
    if not ex.local_experts:
        return
    need = (ep.lo // P, (ep.hi - 1) // P + 1)
    held = (ex.expert_offset, ex.expert_offset + ex.local_experts)
    if need[0] < held[0] or need[1] > held[1]:
        raise RuntimeError(f"dualsparse: MoE block {spec.name!r} on rank {ep.rank} of {ep.world} computes sub-experts "
                           f"{ep.lo}..{ep.hi - 1} (experts {need[0]}..{need[1] - 1}, partition {P}) but holds experts "
                           f"{held[0]}..{held[1] - 1}; shard with shard_experts_(model, group, partition={P}) on the "
                           "same group as option 'expert_parallel'")


@functools.lru_cache(maxsize=256)  # called per EP call with the parsed (cached) spec
def local_spec(spec: MoESpec) -> tuple[MoESpec, int]:
    """(spec of the weights as held, first held sub-expert): global sub-expert s is local sub-expert s - offset."""
    ex = spec.experts
    if not ex.local_experts:
        return spec, 0
    held = spec.replace(num_experts=ex.local_experts,
                        experts=dataclasses.replace(ex, expert_offset=0, local_experts=0))
    return held, ex.expert_offset * spec.partition


# ---- the operators ----------------------------------------------------------------------------------
_CHECKED: set[str] = set()


def _check_once(spec_json: str, ep: EPSpec) -> None:
    """First call of a block on this rank: every rank must have the same spec and expert ranges."""
    if ep.key in _CHECKED:
        return
    group = ds_dist.group_by_name(ep.group)
    spec = parse_spec(spec_json)
    same = spec.replace(drop=DropSpec(mode=spec.drop.mode, shared_outside=spec.drop.shared_outside),  # keys are local
                        experts=dataclasses.replace(spec.experts, expert_offset=0, local_experts=0))  # so are shards
    ds_dist.check_same(same.to_json() + json.dumps([ep.world, ep.ranges]), group, f"MoE block {spec.name!r}")
    _CHECKED.add(ep.key)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _units(index: torch.Tensor, keep: torch.Tensor | None, ep: EPSpec) -> torch.Tensor:
    """Row group of each (token, column) [T, 2K] under ``ep.nested`` (-1: nothing sent). Column j < K carries
    expert index[:, j] to the owner of its Major half, with both halves (group 3 e + 1) when that rank holds
    both and both were kept, else the one kept half it holds (3 e, or 3 e + 2); column K + j carries the Minor
    half alone (3 e + 2) to its own rank when the halves sit on two ranks."""
    nothing = torch.full_like(index, -1)
    if keep is None and not ep.splits_experts:  # every pair whole on one rank (the host needs no count)
        return torch.cat([index * 3 + 1, nothing], dim=1)
    major, minor = (torch.ones_like(index, dtype=torch.bool),) * 2 if keep is None else keep.chunk(2, dim=1)
    if ep.splits_experts:
        split = _split_experts(ep.ranges, index.device)[index] != 0
        minor_here, minor_apart = minor & ~split, minor & split
    else:
        minor_here, minor_apart = minor, None
    code = major.long() + 2 * minor_here.long()  # 0 nothing, 1 Major only, 2 Minor only, 3 both
    together = torch.where(code > 0, index * 3 + _CLASS_OF_CODE(index.device)[code], -1)
    apart = nothing if minor_apart is None else torch.where(minor_apart, index * 3 + 2, -1)
    return torch.cat([together, apart], dim=1)


@functools.lru_cache(maxsize=8)
def _CLASS_OF_CODE(device) -> torch.Tensor:  # noqa: N802 - a constant table
    return torch.tensor([-1, 0, 2, 1], device=device)


def _loads_to(experts: torch.Tensor, spec: MoESpec, ep: EPSpec, kernel: bool = False,
              present: torch.Tensor | None = None) -> torch.Tensor:
    """[W] long: this rank's (token, sub-expert) pairs before dropping, by the rank that holds the sub-expert
    (expert ids [T, K]; after a partial transformation each names P sub-experts e P + p). ``kernel``: one
    launch (``load_policy.loads_to``) instead of these ops. ``present`` [T, K]: absent pairs count nowhere."""
    P = spec.partition if spec.transform == "partial" else 1
    if kernel and present is None:
        from dsmoe_compiler.codegen.load_policy import loads_to

        return loads_to(experts, owners(ep, experts.device), P, ep.world)
    dest = owners(ep, experts.device).view(-1, P)[experts.long()].view(-1)
    # a pair counts once for each sub-expert it names, an absent pair nowhere
    ones = (torch.ones_like(dest) if present is None
            else present.unsqueeze(-1).expand(*present.shape, P).reshape(-1).long())
    return torch.zeros(ep.world, dtype=torch.long, device=experts.device).index_add_(0, dest, ones)


def _per_rank(per_id: torch.Tensor, rank_of: torch.Tensor, world: int, dtype) -> torch.Tensor:
    """[W]: amounts per id ([sources, ids], summed over the sources) summed by the rank that holds each id."""
    return torch.zeros(world, dtype=dtype, device=per_id.device).index_add_(0, rank_of, per_id.sum(0).to(dtype))


def _pair_loads(counts: torch.Tensor, ep: EPSpec) -> torch.Tensor:
    """[W] (token, sub-expert) pairs each rank computes, from every source's rows per group (a nested unit
    carries as many pairs as neuron halves)."""
    if ep.nested:
        halves = halves_of_class(torch.arange(counts.shape[1], device=counts.device) % 3).sum(-1)
        counts = counts * halves
    return _per_rank(counts, _rank_of(ep.group_ranges, counts.device), ep.world, torch.float64)


def _block(spec: MoESpec):
    """The block's run-time drop state (thresholds, statistics), or None when dropping is off."""
    if spec.drop.mode == "none":
        return None
    block = state.lookup(spec.drop.key)
    if block is None:
        raise RuntimeError(f"dualsparse: no run-time state for block {spec.name!r}")
    return block


def _drop(spec: MoESpec, ep: EPSpec, block, policy, raw, experts, sub_experts, pre, owner, group, clock, fused,
          present=None):
    """(keep [T, K'], every rank's pairs per destination before dropping [W, W] when a policy gathered them).
    ``sub_experts()``: ids [T, K']; ``pre()``: this rank's pairs per destination rank [W] before dropping.
    ``fused``: the keep mask (and statistics) by one kernel (``dispatch.keep_per_destination``) where it covers
    the rule. ``present``: a given routing's present pairs (``reference.present_pairs``): the others are neither kept
    nor dropped."""
    gathered_pre = None
    if policy is None:
        thresholds = block.thresholds.expand(ep.world, 2)
    else:
        clock.mark("gather0")
        gathered_pre = ds_dist.all_gather_rows(pre(), group)  # NOTE: one small blocking collective
        clock.mark("gather1")
        rule = load_aware.device_rule(policy) if fused and DEVICE_POLICY else None
        if rule is not None:
            from dsmoe_compiler.codegen.load_policy import policy_thresholds

            thresholds = policy_thresholds(gathered_pre, block.thresholds, rule, spec.drop.mode)
        else:
            loads = gathered_pre.sum(0).float()  # [W]: every source's pairs per destination, summed
            info = load_aware.LoadInfo(spec.name, spec.drop.mode, loads, block.thresholds, ep.rank, ep.world)
            thresholds = load_aware.thresholds_per_rank(policy, info)
    if fused and present is None:
        from dsmoe_compiler.codegen import dispatch

        if dispatch.drop_rules_ok(spec):
            keep = dispatch.keep_per_destination(raw, experts, spec, thresholds, owner, block.stats)
            return keep.view(torch.bool), gathered_pre
    keep = reference.with_present(keep_per_destination(raw, sub_experts(), spec, thresholds, owner), present)
    if block.stats is not None:
        reference.record_drops(block.stats, keep, spec, present)
    return keep, gathered_pre


def _route(x, params, spec: MoESpec, block, policy, fused: bool):
    """(routing weights [T, K], expert ids [T, K], keep [T, K'] when the route kernel dropped, else None).
    Uniform thresholds (no policy) are applied in the route kernel where it covers the rule."""
    if not fused:
        _, raw, experts = reference.route(x, params, spec)
        return raw, experts, None
    from dsmoe_compiler.codegen import dispatch

    if block is not None and policy is None and dispatch.drop_in_route_ok(spec, x.dtype):
        raw, experts, keep = dispatch.route_and_drop(x, params, spec, block.thresholds, block.stats)
        return raw, experts, keep.view(torch.bool)
    raw, experts = dispatch.route(x, params, spec)  # int32 ids
    return raw, experts, None


def _groups(experts, sub_experts, keep, ep: EPSpec, fused: bool = False) -> torch.Tensor:
    """The row group of every (token, column) [T, width]: its sub-expert (``sub_experts()``), or under
    ``ep.nested`` its unit's group (``_units``, or its kernel when ``fused``); -1 where nothing is sent."""
    if ep.nested and fused:
        from dsmoe_compiler.codegen.dispatch import nested_units

        return nested_units(experts, keep, _split_experts(ep.ranges, experts.device) if ep.splits_experts else None)
    if ep.nested:
        return _units(experts, keep, ep)
    return sub_experts() if keep is None else torch.where(keep, sub_experts(), -1)


@functools.lru_cache(maxsize=64)
def _split_experts(ranges: tuple[int, ...], device) -> torch.Tensor:
    """[E] int32: 1 where expert e's two halves (sub-experts 2 e, 2 e + 1) sit on two ranks (P = 2)."""
    owner = _rank_of(ranges, device)
    return (owner[0::2] != owner[1::2]).to(torch.int32)


def _on_kernels(impl: str, x: torch.Tensor) -> bool:
    """impl "triton" where a kernel can run x: on a GPU (or the interpreter) and in a dtype the kernels are for (fp64
    takes the torch path, as ``dispatch.moe_triton`` does)."""
    return impl == "triton" and (x.is_cuda or INTERPRETED) and x.dtype in KERNEL_DTYPES


def _fused(impl: str, x: torch.Tensor) -> bool:
    return FUSED and _on_kernels(impl, x)


def rows_bound(tokens: int, width: int, ep: EPSpec) -> int:
    """The most rows a rank can send: one per (token, column), or under nesting with no expert split across
    ranks one per (token, slot) (the Minor-alone columns K.. stay empty). The send buffer has this many rows;
    the exchange sends the first sum(send splits) of them (``sent_rows``)."""
    return tokens * (width // 2 if ep.nested and not ep.splits_experts else width)


def _send_order(x, group_of: torch.Tensor, ep: EPSpec, fused: bool):
    """(send [rows_bound, H]: the rows in send order, by group, valid for the first sum(rows per group); row
    [T, width] int32: each (token, column)'s row of send, -1 if nothing was sent; rows per group [groups]
    (long)). No host synchronisation: how many rows are sent stays on the device."""
    T, width = group_of.shape
    bound = rows_bound(T, width, ep)
    if fused:
        from dsmoe_compiler.codegen.dispatch import group_rows
        from dsmoe_compiler.codegen.gather_rows import gather_rows

        token, post, row = group_rows(group_of, ep.groups)
        if READ_ROW_COUNT:
            int(post.sum())
        return gather_rows(x, token, post, bound), row, post.long()
    flat = group_of.reshape(-1)
    sent = flat >= 0
    order = torch.argsort(torch.where(sent, flat, ep.groups), stable=True)[:bound]  # sent first, by group
    row = torch.full_like(flat, -1, dtype=torch.int32)
    row[order] = torch.where(sent[order], torch.arange(bound, dtype=torch.int32, device=x.device), -1)
    post = torch.zeros(ep.groups, dtype=torch.long, device=x.device).index_add_(0, flat.clamp(min=0), sent.long())
    return x[order // width], row.view(T, width), post  # rows past the sent ones: copies of unsent entries' tokens


def _weighted_rows(send: torch.Tensor, row: torch.Tensor, weights: torch.Tensor):
    """(send rows times their pair's weight, cast back to the rows' dtype as ``reference.experts`` scales an expert's
    input; unit combine weights). ``row`` [T, width] names each (token, column)'s send row (-1: none), ``weights``
    the same columns' weights (under nesting both halves of a slot may name one row: they carry the same weight).
    No host synchronisation: unsent entries scatter into a spare last slot."""
    bound = send.shape[0]
    per_row = torch.zeros(bound + 1, dtype=weights.dtype, device=send.device)
    per_row.scatter_(0, torch.where(row >= 0, row, bound).reshape(-1).long(), weights.reshape(-1))
    return (send * per_row[:bound, None]).to(send.dtype), torch.ones_like(weights)


def sent_rows(send: torch.Tensor, send_splits: list[int]) -> torch.Tensor:
    """The rows of the send buffer that the exchange sends: the first sum(send_splits) (a view)."""
    n = sum(send_splits)
    torch._check(n >= 0)
    torch._check(n <= send.shape[0])
    return send.narrow(0, 0, n)


def _exchange_counts(pre, post, keep, gathered_pre, ep: EPSpec, group) -> torch.Tensor:
    """Every rank's rows per group [W, groups] (one all-gather), and with statistics the loads per rank."""
    if ep.stats and keep is not None and gathered_pre is None:  # loads before dropping: in the same gather
        before = pre()
        both = ds_dist.all_gather_rows(torch.cat([before, post]), group)
        gathered_pre, counts = both[:, :before.numel()], both[:, before.numel():].contiguous()
    else:
        counts = ds_dist.all_gather_rows(post, group)
    if ep.stats:
        after = _pair_loads(counts, ep)
        before = after if keep is None else gathered_pre.sum(0).double()
        _STATS[ep.key].add_loads(before, after)
    return counts


def route(x: torch.Tensor, params, spec_json: str, ep_json: str, impl: str = "reference"):
    spec, ep = parse_spec(spec_json), parse_ep(ep_json)
    clock = _Clock(ep, x.device)
    clock.mark("route0")
    _check_once(spec_json, ep)
    group = ds_dist.group_by_name(ep.group)
    x = _flat(x)
    fused = _fused(impl, x)
    block = _block(spec)
    policy = load_aware.get_policy(spec.name) if block is not None else None
    raw, experts, keep = _route(x, params, spec, block, policy, fused)
    partial = spec.transform == "partial" and spec.partition > 1
    weights = raw.repeat(1, spec.partition) if partial else raw  # one weight per column (slot, half)
    sub_experts = functools.cache(  # [T, K'] sub-expert ids, only where read
        lambda: reference.partial_transform(experts, raw, spec.partition)[0] if partial else experts)
    owner = owners(ep, x.device)
    present = reference.present_pairs(params, spec)  # a given id on no expert (LongCat-Flash's): sent nowhere
    pair_present = None if present is None else present[:, :spec.top_k]  # [T, K], before the columns of P
    pre = lambda: _loads_to(experts, spec, ep, fused and DEVICE_POLICY, pair_present)  # noqa: E731 - [W] per destination
    clock.mark("gather0")
    clock.mark("gather1")
    gathered_pre = None
    if block is not None and keep is None:
        keep, gathered_pre = _drop(spec, ep, block, policy, raw, experts, sub_experts, pre, owner, group, clock,
                                   fused, present)
    else:
        keep = reference.with_present(keep, present)
    group_of = _groups(experts, sub_experts, keep, ep, fused)
    send, row, post = _send_order(x, group_of, ep, fused)
    if spec.experts.weight_on_input:  # Llama-4: the sender scales each row; the combine then only sums
        send, weights = _weighted_rows(send, row, weights)
    clock.mark("gather2")
    counts = _exchange_counts(pre, post, keep, gathered_pre, ep, group)
    sizes = _exchange_sizes(counts, ep, fused and SIZES_KERNEL)
    clock.mark("gather3")
    clock.mark("route1")
    for kind, a, b in (("compute", "route0", "gather0"), ("comm", "gather0", "gather1"), ("compute", "gather1", "gather2"),
                       ("comm", "gather2", "gather3"), ("compute", "gather3", "route1")):
        clock.span(kind, a, b)
    return send, row, weights.contiguous(), counts, sizes


def _exchange_sizes(counts: torch.Tensor, ep: EPSpec, fused: bool) -> torch.Tensor:
    """[2 W] long: the rows this rank sends to each rank, then the rows it receives from each (from every rank's
    rows per group); one launch when ``fused`` (``codegen/exchange_sizes.py``)."""
    if fused:
        from dsmoe_compiler.codegen.exchange_sizes import exchange_sizes

        return exchange_sizes(counts, _rank_of(ep.group_ranges, counts.device), ep.rank)
    from dsmoe_compiler.codegen.exchange_sizes import exchange_sizes_reference

    return exchange_sizes_reference(counts, ep.group_ranges, ep.rank)


def splits(sizes: torch.Tensor, ep_json: str) -> tuple[list[int], list[int]]:
    """(send splits, receive splits) in rows from ``ep_route``'s sizes. NOTE: host synchronisation (the sizes of
    the exchange), the block's only one."""
    world = parse_ep(ep_json).world
    both = sizes.tolist()
    return both[:world], both[world:]


@functools.lru_cache(maxsize=None)
def _rows_spec(spec_json: str, nested: bool) -> tuple[MoESpec, int]:
    """(spec of the held weights for rows that name their expert, first held sub-expert): one sub-expert per
    row (transform "complete", top-1), or under nesting one expert per row with its halves (P = 2 partial,
    top-1); dropping off. Cached, so the kernels' plan (keyed by the spec object) is reused from call to call."""
    held, offset = local_spec(parse_spec(spec_json))
    return held.replace(transform="partial" if nested else "complete", top_k=1, drop=DropSpec()), offset


def local_experts(recv: torch.Tensor, counts: torch.Tensor, params, spec_json: str, ep_json: str,
                  impl: str = "reference"):
    """Unweighted outputs of the local sub-experts on the received rows (by source rank, then group). Under
    ``ep.nested`` a row's output sums the neuron halves its group names."""
    spec, ep = parse_spec(spec_json), parse_ep(ep_json)
    clock = _Clock(ep, recv.device)
    clock.mark("experts0")
    clock.span("comm", "route1", "experts0")  # dispatch
    lo, hi = ep.group_ranges[ep.rank], ep.group_ranges[ep.rank + 1]
    check_local_weights(spec, ep)
    held, offset = local_spec(spec)  # sharded weights: global sub-expert s is s - offset in params
    label_offset = offset // 2 if ep.nested else offset  # labels: local experts, or local sub-experts
    if _on_kernels(impl, recv) and spec.experts.layout == "fused":
        from dsmoe_compiler.codegen.dispatch import labelled_rows, received_rows

        rows_spec, _ = _rows_spec(spec_json, ep.nested)
        if FUSED:
            y = received_rows(recv, counts, lo, hi, params, rows_spec, nested=ep.nested, label_offset=label_offset)
        else:
            label, halves = received_rows_reference(counts, lo, hi, recv.shape[0], ep.nested, label_offset)
            y = labelled_rows(recv, label, params, rows_spec, halves if ep.nested else None)
    else:
        label, halves = received_rows_reference(counts, lo, hi, recv.shape[0], ep.nested, label_offset)
        y = _local_loop(recv, label, halves, params, spec, held, offset, ep)
    clock.mark("experts1")
    clock.span("compute", "experts0", "experts1")
    return y


def _local_loop(recv, label, halves, params, spec, held, offset, ep):
    """The local step in torch, sub-expert by sub-expert (rows summed over halves in fp32). label: each row's
    local sub-expert, or under nesting its local expert with its halves [n, 2]; offset: the first held sub-expert."""
    y = torch.zeros(recv.shape, dtype=torch.float32, device=recv.device)
    ex = spec.experts
    for s in range(ep.lo, ep.hi):
        local = s - offset
        mine = (label == local // 2) & halves[:, local % 2] if ep.nested else label == local
        rows = mine.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        gate, up, down, gb, ub, db = reference.sub_expert_weights(params, held, local)
        xs = recv[rows]
        h = reference.expert_glu(None if gate is None else F.linear(xs, gate, gb), F.linear(xs, up, ub), ex)
        y[rows] += F.linear(h, down, db).float()
    return y.to(recv.dtype)


def combine(x: torch.Tensor, back: torch.Tensor, row: torch.Tensor, weight: torch.Tensor, params,
            spec_json: str, ep_json: str, impl: str = "reference", shared: torch.Tensor | None = None):
    """out[t] = sum over slots j of weight[t, j] * back[row[t, j]] (row -1: dropped), in fp32, + shared experts
    (``shared``: their output, computed by ``ep_shared`` while the combine exchange was in flight)."""
    spec, ep = parse_spec(spec_json), parse_ep(ep_json)
    clock = _Clock(ep, x.device)
    clock.mark("combine0")
    clock.span("comm", "experts1", "combine0")
    flat = _flat(x)
    if _on_kernels(impl, back) and back.is_cuda:
        out = gather_combine(back, row, weight, flat.dtype)
    else:
        out = gather_combine_reference(back, row, weight, flat.dtype)
    if shared is None and spec.shared is not None:  # a caller that did not run ep_shared
        shared = _shared_experts(x, params, spec_json)
    if shared is not None:
        out = out + shared.view(out.shape)
    clock.mark("combine1")
    clock.span("compute", "combine0", "combine1")
    return out.view_as(x)


# ---- as custom ops (opaque to dynamo / AOT / inductor; data-dependent sizes are unbacked) ---------------
# Registered through torch.library.Library, as ``dualsparse::moe`` is (``ops.py``): @custom_op's Python wrapper
# (autograd, aliasing checks) cost 40-105 us per call on the 2 x H200 host against the function called
# directly (``benchmarks/ep_nccl.py --host-profile``), four times per EP block. Inference only; no output
# aliases an input (``test_expert_parallel.py::test_fake_outputs_match_the_real_ones`` checks).
_LIB = torch.library.Library("dualsparse", "FRAGMENT")
_LIB.define("ep_route(Tensor x, Tensor[] params, str spec, str ep, str impl='reference') "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define("ep_experts(Tensor recv, Tensor counts, Tensor[] params, str spec, str ep, str impl='reference') -> Tensor")
_LIB.define("ep_combine(Tensor x, Tensor back, Tensor row, Tensor weight, Tensor[] params, str spec, str ep, "
            "str impl='reference', Tensor? shared=None) -> Tensor")
_LIB.define("ep_shared(Tensor x, Tensor[] params, str spec) -> Tensor")


def _shared_experts(x, params, spec):
    """The shared experts on this rank's tokens [T, H] (they need no exchange: the graph runs them while the
    combine all_to_all is in flight, and ``ep_combine`` adds them)."""
    return reference.shared_experts(_flat(x), params, parse_spec(spec)).contiguous()


for _name, _fn in (("ep_route", route), ("ep_experts", local_experts), ("ep_combine", combine),
                   ("ep_shared", _shared_experts)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")
    # not differentiable: their outputs need no gradient (the block's gradients come from gradients.ep_trainable)
    _LIB.impl(_name, torch.library.fallthrough_kernel, "Autograd")


def pairs_per_token(spec: MoESpec) -> int:
    """(token, sub-expert) slots per token after the partition: K * P (complete: top-k * P; partial: indices
    expanded P times)."""
    return spec.top_k * (spec.partition if spec.transform in ("complete", "partial") else 1)


@torch.library.register_fake("dualsparse::ep_route")
def _(x, params, spec, ep, impl="reference"):
    s, e = parse_spec(spec), parse_ep(ep)
    wdtype = torch.float32 if s.routing.weights_fp32 else x.dtype
    T, K = _flat(x).shape[0], pairs_per_token(s)
    return (x.new_empty(rows_bound(T, K, e), x.shape[-1]), x.new_empty(T, K, dtype=torch.int32),
            x.new_empty(T, K, dtype=wdtype),
            x.new_empty(e.world, e.groups, dtype=torch.long),  # counts per row group (nested units: 3 E of them)
            x.new_empty(2 * e.world, dtype=torch.long))  # exchange sizes: send, then receive


@torch.library.register_fake("dualsparse::ep_experts")
def _(recv, counts, params, spec, ep, impl="reference"):
    return torch.empty_like(recv)


@torch.library.register_fake("dualsparse::ep_combine")
def _(x, back, row, weight, params, spec, ep, impl="reference", shared=None):
    return torch.empty_like(x)


@torch.library.register_fake("dualsparse::ep_shared")
def _(x, params, spec):
    return x.new_empty(_flat(x).shape)


ep_route, ep_experts = torch.ops.dualsparse.ep_route, torch.ops.dualsparse.ep_experts
ep_combine, ep_shared = torch.ops.dualsparse.ep_combine, torch.ops.dualsparse.ep_shared


def moe(x: torch.Tensor, params, spec_json: str, ep_json: str, impl: str = "reference") -> torch.Tensor:
    """The whole EP block eagerly, in the order the pass puts into the graph (for tests and benchmarks)."""
    send, row, weight, counts, sizes = ep_route(x, params, spec_json, ep_json, impl)
    send_splits, recv_splits = splits(sizes, ep_json)
    name = parse_ep(ep_json).group
    recv = ds_dist.all_to_all(sent_rows(send, send_splits), recv_splits, send_splits, name)
    y = ep_experts(recv, counts, params, spec_json, ep_json, impl)
    pending = torch.ops._c10d_functional.all_to_all_single(y, send_splits, recv_splits, name)
    has_shared = parse_spec(spec_json).shared is not None
    shared = ep_shared(x, params, spec_json) if has_shared and SHARED_OVERLAP else None  # overlaps the exchange
    back = torch.ops._c10d_functional.wait_tensor(pending)
    if has_shared and not SHARED_OVERLAP:
        shared = ep_shared(x, params, spec_json)
    return ep_combine(x, back, row, weight, params, spec_json, ep_json, impl, shared)
