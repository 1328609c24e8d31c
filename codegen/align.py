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

A partial transformation with P = 2 (the Major / Minor halves of 2T) is grouped differently, by
``count_nested_kernel`` / ``scatter_nested_kernel`` (end of this file): one group per expert, one
row per (token, slot), the halves it kept nested in the row order. Two groups per expert would give
each half its own partly empty last tile (measured: 2T at 0 % drop 5-15 % slower than no partition).
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


# ---- nested halves: a partial transformation with P = 2 ----------------------------------------------
# Pair (t, slot) of expert e has a Major half (neurons [0, c)) and a Minor half ([c, 2c)); dropping keeps
# either, both or neither. Instead of two groups per expert (two partly empty last tiles, y rows per half),
# each expert keeps one group of rows, one row per (t, slot) with any half kept, ordered by class:
#   [Major only (A) | both (B) | Minor only (C)]
# so the rows needing the Major half are a prefix [0, A + B) and those needing the Minor half a suffix
# [A, A + B + C). counts holds [A of every expert | B of every expert | C of every expert].

@triton.jit
def _nested_class(index_ptr, keep_ptr, rows, offs, E, TOPK, HAS_KEEP: tl.constexpr):
    """(counter = class * E + expert or -1 when nothing of the pair is kept, expert, class) of rows offs."""
    valid = offs < rows
    expert = tl.load(index_ptr + offs, mask=valid, other=0)
    major = valid
    minor = valid
    if HAS_KEEP:  # keep columns: Major halves 0..TOPK-1, Minor halves TOPK..2 TOPK-1 of each token
        column = (offs // TOPK) * (2 * TOPK) + offs % TOPK
        major = valid & (tl.load(keep_ptr + column, mask=valid, other=0) != 0)
        minor = valid & (tl.load(keep_ptr + column + TOPK, mask=valid, other=0) != 0)
    cls = tl.where(major & minor, 1, tl.where(major, 0, 2))
    return tl.where(major | minor, cls * E + expert, -1), expert, cls


@triton.jit
def count_nested_kernel(index_ptr, keep_ptr, counts_ptr, rank_ptr, rows, E, TOPK,
                        HAS_KEEP: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    counter, _, _ = _nested_class(index_ptr, keep_ptr, rows, offs, E, TOPK, HAS_KEEP)
    live = counter >= 0
    rank = tl.atomic_add(counts_ptr + counter, 1, mask=live)
    tl.store(rank_ptr + offs, rank, mask=live)


@triton.jit
def scatter_nested_kernel(index_ptr, keep_ptr, counts_ptr, rank_ptr, sorted_ptr, rows, E, TOPK,
                          HAS_KEEP: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    counter, expert, cls = _nested_class(index_ptr, keep_ptr, rows, offs, E, TOPK, HAS_KEEP)
    live = counter >= 0
    experts = tl.arange(0, BLOCK_SUBS)
    major_only = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    both = tl.load(counts_ptr + E + experts, mask=experts < E, other=0)
    total = major_only + both + tl.load(counts_ptr + 2 * E + experts, mask=experts < E, other=0)
    e = tl.where(live, expert, 0)
    start = tl.gather(tl.cumsum(total, 0) - total, e, 0)
    a = tl.gather(major_only, e, 0)
    start += tl.where(cls == 0, 0, tl.where(cls == 1, a, a + tl.gather(both, e, 0)))
    rank = tl.load(rank_ptr + offs, mask=live, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=live)
