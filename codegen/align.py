"""Group (token, sub-expert) pairs by sub-expert on the device, with no host synchronisation.

A pair is one column of the routed index: pair j = t * PAIRS + col of token t, PAIRS = K * P columns
per token. With a partial transformation (paper Eq. 12) column col reads routed slot col % K and
neuron group p = col // K, so sub-expert = index[t, col % K] * P + p; nothing is materialised.
Dropped pairs (keep[t, col] false) are never counted, so they take no rows and no FLOPs later.

Two launches, because the second needs every count of the first:
1. ``count_kernel``: each kept pair's rank (its place inside its group). A program of BLOCK_PAIRS pairs
   ranks them inside the block in registers (a sort by group), then reserves each group's rows with ONE
   atomic_add(counts[s], block count); rank = the returned base + local rank. One atomic per pair
   serialised on same-address contention (H200 layer breakdowns, OLMoE 4096 tokens: 0.010-0.011 ms that
   way, 0.003-0.004 ms this way; results/h200/gemm_sweep_olmoe_4096.json, layer_ab_split_atomic.json); more than
   256 groups still take one per pair (fewer pairs per counter; per-group vectors mostly empty).
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
def _count_and_rank(counts_ptr, rank_ptr, group, num_groups, BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    """Add this program's live pairs (group >= 0) to counts and store each one's rank inside its group;
    over all programs the ranks of a group are exactly 0..count - 1. BLOCK_SUBS: power of two >= num_groups."""
    i = tl.arange(0, BLOCK_PAIRS)
    first = tl.program_id(0) * BLOCK_PAIRS
    live = group >= 0
    if BLOCK_SUBS <= 256:
        groups = tl.arange(0, BLOCK_SUBS)
        block_counts = tl.histogram(group, BLOCK_SUBS, mask=live)
        # one atomic per group present in the block reserves its rows; base = rows taken before it
        base = tl.atomic_add(counts_ptr + groups, block_counts, mask=(groups < num_groups) & (block_counts > 0))
        # Local ranks by a register sort of keys (group, i), dead pairs last: the pair in sorted slot k has
        # k - (live pairs of smaller groups) earlier pairs of its group. (A one-hot [pairs x groups] cumsum
        # would need registers growing with the number of groups.)
        key = tl.sort(tl.where(live, group, BLOCK_SUBS) * BLOCK_PAIRS + i)
        s = key // BLOCK_PAIRS
        shift = base - (tl.cumsum(block_counts, 0) - block_counts)
        rank = tl.gather(shift, tl.minimum(s, BLOCK_SUBS - 1), 0) + i
        tl.store(rank_ptr + first + key % BLOCK_PAIRS, rank, mask=s < BLOCK_SUBS)
    else:  # many groups: one atomic per pair
        rank = tl.atomic_add(counts_ptr + group, 1, mask=live)
        tl.store(rank_ptr + first + i, rank, mask=live)


@triton.jit
def count_kernel(index_ptr, keep_ptr, counts_ptr, rank_ptr, pairs, TOPK, PAIRS, P, num_subs,
                 HAS_KEEP: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    sub = _sub_expert(index_ptr, keep_ptr, pairs, offs, TOPK, PAIRS, P, HAS_KEEP)
    _count_and_rank(counts_ptr, rank_ptr, sub, num_subs, BLOCK_PAIRS, BLOCK_SUBS)


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
def _kept_halves(keep_ptr, offs, valid, TOPK, HAS_KEEP: tl.constexpr):
    """(Major kept, Minor kept) of the (token, slot) pairs offs = t * TOPK + j; keep columns: Major halves
    0..TOPK-1, Minor halves TOPK..2 TOPK-1 of each token (all kept without HAS_KEEP)."""
    major = valid
    minor = valid
    if HAS_KEEP:
        column = (offs // TOPK) * (2 * TOPK) + offs % TOPK
        major = valid & (tl.load(keep_ptr + column, mask=valid, other=0) != 0)
        minor = valid & (tl.load(keep_ptr + column + TOPK, mask=valid, other=0) != 0)
    return major, minor


@triton.jit
def _unit_class(major, minor):
    """Class of a pair by the halves it keeps: 0 Major only, 1 both, 2 Minor only (meaningless when neither)."""
    return tl.where(major & minor, 1, tl.where(major, 0, 2))


@triton.jit
def _nested_class(index_ptr, keep_ptr, rows, offs, E, TOPK, HAS_KEEP: tl.constexpr):
    """(counter = class * E + expert or -1 when nothing of the pair is kept, expert, class) of rows offs."""
    valid = offs < rows
    expert = tl.load(index_ptr + offs, mask=valid, other=0)
    major, minor = _kept_halves(keep_ptr, offs, valid, TOPK, HAS_KEEP)
    cls = _unit_class(major, minor)
    return tl.where(major | minor, cls * E + expert, -1), expert, cls


@triton.jit
def count_nested_kernel(index_ptr, keep_ptr, counts_ptr, rank_ptr, rows, E, TOPK, num_counters,
                        HAS_KEEP: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    """As count_kernel over the num_counters = 3 * E counters (BLOCK_SUBS: power of two >= 3 * E)."""
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    counter, _, _ = _nested_class(index_ptr, keep_ptr, rows, offs, E, TOPK, HAS_KEEP)
    _count_and_rank(counts_ptr, rank_ptr, counter, num_counters, BLOCK_PAIRS, BLOCK_SUBS)


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


# ---- entries that already name their group: expert parallelism's send order -------------------------------
# ``runtime/ep.py`` gives every (token, column) entry of a [T, width] table the row group it travels in (a
# sub-expert, or a nested unit 3 e + c), -1 when nothing is sent; the send buffer holds the rows by group.

@triton.jit
def count_groups_kernel(group_ptr, counts_ptr, rank_ptr, n, num_groups,
                        BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    """As count_kernel, on int32 group ids read from group_ptr (-1: not sent)."""
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    group = tl.load(group_ptr + offs, mask=offs < n, other=-1)
    _count_and_rank(counts_ptr, rank_ptr, group, num_groups, BLOCK_PAIRS, BLOCK_SUBS)


@triton.jit
def place_groups_kernel(group_ptr, counts_ptr, rank_ptr, token_ptr, row_ptr, n, width, num_groups,
                        BLOCK_PAIRS: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    """Entry j's row = start of its group + its rank: token[row] = j // width (the row's source token) and
    row_ptr[j] = row, or -1 for an entry not sent."""
    offs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    valid = offs < n
    group = tl.load(group_ptr + offs, mask=valid, other=-1)
    live = group >= 0
    groups = tl.arange(0, BLOCK_SUBS)
    counts = tl.load(counts_ptr + groups, mask=groups < num_groups, other=0)
    start = tl.gather(tl.cumsum(counts, 0) - counts, tl.where(live, group, 0), 0)
    row = start + tl.load(rank_ptr + offs, mask=live, other=0)
    tl.store(token_ptr + row, offs // width, mask=live)
    tl.store(row_ptr + offs, tl.where(live, row, -1), mask=valid)


@triton.jit
def nested_units_kernel(experts_ptr, keep_ptr, split_ptr, group_ptr, n, TOPK,
                        HAS_KEEP: tl.constexpr, HAS_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """Row groups of EP's nested units (P = 2 partial) for the n = T * TOPK (token, slot) pairs, into
    group [T, 2 TOPK]: column j carries expert e = experts[t, j] to the owner of its Major half, group 3 e + c
    (c: 0 Major only, 1 both, 2 Minor only; -1 nothing kept there); column TOPK + j carries the Minor half alone
    (3 e + 2) when split[e] puts it on another rank, else -1. keep [T, 2 TOPK]: Major halves, then Minor."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    expert = tl.load(experts_ptr + offs, mask=valid, other=0)
    major, minor = _kept_halves(keep_ptr, offs, valid, TOPK, HAS_KEEP)
    minor_apart = valid & (expert < 0)  # all false
    if HAS_SPLIT:
        split = tl.load(split_ptr + expert, mask=valid, other=0) != 0
        minor_apart = minor & split
        minor = minor & (split == 0)  # the Minor half travels with the Major one
    cls = _unit_class(major, minor)
    out = (offs // TOPK) * 2 * TOPK + offs % TOPK
    tl.store(group_ptr + out, tl.where(major | minor, 3 * expert + cls, -1), mask=valid)
    tl.store(group_ptr + out + TOPK, tl.where(minor_apart, 3 * expert + 2, -1), mask=valid)
