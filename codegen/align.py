"""Group (token, sub-expert) pairs by sub-expert on the device, with no host synchronisation.

A pair is one column of the routed index: pair j = t * PAIRS + col of token t, PAIRS = K * P columns
per token. With a partial transformation (paper Eq. 12) column col reads routed slot col % K and
neuron group p = col // K, so sub-expert = index[t, col % K] * P + p; nothing is materialised.
Dropped pairs (keep[t, col] false) are never counted, so they take no rows and no FLOPs later.

Two launches, because the second needs every count of the first:
1. ``count_kernel``: per kept pair, rank = atomic_add(counts[s], 1) (its place inside its group).
2. ``scatter_kernel``: start of each group = exclusive cumsum of counts (recomputed per program,
   cheap for a few thousand groups); sorted[start[s] + rank] = j.
The order of rows inside a group depends on the atomics, but every row of a grouped GEMM is
computed independently and written back to its own pair, so the result does not depend on it.
"""

import triton
import triton.language as tl


@triton.jit
def _sub_expert(index_ptr, keep_ptr, pairs, offs, TOPK, PAIRS, P, HAS_KEEP: tl.constexpr):
    """Sub-expert id of pair offs (or -1 when out of range or dropped)."""
    valid = offs < pairs
    token = offs // PAIRS
    col = offs % PAIRS
    routed = tl.load(index_ptr + token * TOPK + col % TOPK, mask=valid, other=0)
    sub = routed * P + col // TOPK
    if HAS_KEEP:
        valid = valid & (tl.load(keep_ptr + offs, mask=valid, other=0) != 0)
    return tl.where(valid, sub, -1)


@triton.jit
def count_kernel(index_ptr, keep_ptr, counts_ptr, rank_ptr, pairs, TOPK, PAIRS, P,
                 HAS_KEEP: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    sub = _sub_expert(index_ptr, keep_ptr, pairs, offs, TOPK, PAIRS, P, HAS_KEEP)
    live = sub >= 0
    rank = tl.atomic_add(counts_ptr + sub, 1, mask=live)
    tl.store(rank_ptr + offs, rank, mask=live)


@triton.jit
def scatter_kernel(index_ptr, keep_ptr, counts_ptr, rank_ptr, sorted_ptr, pairs, TOPK, PAIRS, P, num_subs,
                   HAS_KEEP: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    sub = _sub_expert(index_ptr, keep_ptr, pairs, offs, TOPK, PAIRS, P, HAS_KEEP)
    live = sub >= 0
    # start offset of every group (exclusive cumsum), then each pair's own group start by a register gather
    groups = tl.arange(0, BLOCK_SUBS)
    counts = tl.load(counts_ptr + groups, mask=groups < num_subs, other=0)
    starts = tl.cumsum(counts, 0) - counts
    start = tl.gather(starts, tl.where(live, sub, 0), 0)
    rank = tl.load(rank_ptr + offs, mask=live, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=live)
