"""Router scores, top-k, renormalisation and scale of a block of tokens in one kernel.

Replaces reference.route's chain of softmax / topk / gather / sum / div / mul / cast (about ten
launches) after the router GEMM. Covers score_func softmax or sigmoid, score_after_topk (GPT-OSS),
score_bias (selection only), renormalize with eps (and a floor, renorm_min), scale, a per-expert scale
(expert_scale); group-limited routing and the complete
transformation stay on reference.route (``dispatch.py`` decides). Top-k is k rounds of argmax;
ties go to the lowest expert id.

Fused into the same launch (each optional, so one forward needs fewer launches and no torch ops):
- ZERO_COUNTS: program 0 zeroes the alignment counts (``align.count_kernel`` runs next);
- DROP (1 = 1t, 2 = 2t, 3 = skip, 4 = topk): the keep mask of ``reference.keep_mask`` from the stored
  (rounded) weights and the device-side thresholds, written [T, TOPK * COPIES] in the slot order the
  experts see (partial transformation: COPIES = P column blocks; 2t: block 0 Major, block 1 Minor);
- HAS_STATS: ``reference.record_drops`` as two fp64 atomics per program (integer counts: exact).

``keep_per_destination_kernel`` (end of file) applies the same rules after routing, each pair judged with the
thresholds of the rank that computes it (expert parallelism with a load-aware policy, ``runtime/ep.py``).
"""

import triton
import triton.language as tl


@triton.jit
def topk_route_kernel(
    logits_ptr, score_bias_ptr, expert_scale_ptr, weights_ptr, index_ptr, counts_ptr, thresholds_ptr, keep_ptr,
    stats_ptr, T, E, num_subs, stride_lt, renorm_eps, renorm_min, scale, per_slot, units_per_token,
    TOPK: tl.constexpr, SIGMOID: tl.constexpr, AFTER_TOPK: tl.constexpr, RENORM: tl.constexpr,
    HAS_SCORE_BIAS: tl.constexpr, ROUND_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    ZERO_COUNTS: tl.constexpr = False, BLOCK_SUBS: tl.constexpr = 1, DROP: tl.constexpr = 0,
    COPIES: tl.constexpr = 1, HAS_STATS: tl.constexpr = False, HAS_EXPERT_SCALE: tl.constexpr = False,
):
    if ZERO_COUNTS:
        if tl.program_id(0) == 0:
            subs = tl.arange(0, BLOCK_SUBS)
            tl.store(counts_ptr + subs, tl.zeros((BLOCK_SUBS,), dtype=tl.int32), mask=subs < num_subs)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    mask_t = rows < T
    valid = mask_t[:, None] & (cols[None, :] < E)
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :], mask=valid, other=float("-inf"))
    logits = tl.where(mask_t[:, None], logits.to(tl.float32), 0.0)  # rows past T: finite, never stored
    if AFTER_TOPK:
        scores = logits
    elif SIGMOID:
        scores = tl.sigmoid(logits)
        if ROUND_SCORES:  # the reference takes the sigmoid in the logits' own dtype
            scores = scores.to(logits_ptr.dtype.element_ty).to(tl.float32)
    else:
        shifted = logits - tl.max(logits, axis=1)[:, None]
        num = tl.exp(shifted)
        scores = num / tl.sum(num, axis=1)[:, None]
    choice = tl.where(valid, scores, float("-inf"))
    if HAS_SCORE_BIAS:
        choice += tl.load(score_bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]

    ks = tl.arange(0, BLOCK_K)
    picked = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    picked_idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOPK):
        best = tl.argmax(choice, axis=1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        picked = tl.where(ks[None, :] == k, value[:, None], picked)
        picked_idx = tl.where(ks[None, :] == k, best[:, None], picked_idx)
        choice = tl.where(hit, float("-inf"), choice)

    live_k = ks[None, :] < TOPK
    if AFTER_TOPK:  # GPT-OSS: softmax over the k selected logits
        picked = tl.where(live_k, picked, float("-inf"))
        num = tl.exp(picked - tl.max(picked, axis=1)[:, None])
        picked = num / tl.sum(num, axis=1)[:, None]
    else:
        if RENORM:
            total = tl.sum(tl.where(live_k, picked, 0.0), axis=1)
            picked = picked / tl.maximum(total + renorm_eps, renorm_min)[:, None]  # renorm_min: Ernie-4.5's clamp
        picked = picked * scale
        if HAS_EXPERT_SCALE:  # Gemma-4: a per-expert factor at the selected experts
            scale_mask = mask_t[:, None] & live_k
            picked *= tl.load(expert_scale_ptr + picked_idx, mask=scale_mask, other=0.0).to(tl.float32)
    out = rows[:, None] * TOPK + ks[None, :]
    store_mask = mask_t[:, None] & live_k
    tl.store(weights_ptr + out, picked.to(weights_ptr.dtype.element_ty), mask=store_mask)
    tl.store(index_ptr + out, picked_idx, mask=store_mask)

    if DROP != 0:  # reference.normalized_scores on the weights as stored, then reference.keep_mask's rule
        w = picked.to(weights_ptr.dtype.element_ty).to(tl.float32)
        dropped = _drop_slots(w, store_mask, ks, rows, keep_ptr, thresholds_ptr, thresholds_ptr, 0, 0, 1,
                              TOPK, COPIES, DROP, False, BLOCK_T, BLOCK_K)
        if HAS_STATS:
            _add_drop_stats(stats_ptr, dropped, mask_t, per_slot, units_per_token)


@triton.jit
def _drop_slots(w, live, ks, rows, keep_ptr, thresholds_ptr, owner_ptr, index, stride_dest, P,
                TOPK: tl.constexpr, COPIES: tl.constexpr, DROP: tl.constexpr, PER_DEST: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """reference.keep_mask's rule DROP on the stored weights w [BLOCK_T, BLOCK_K] (fp32; live: real slots), keep
    written [T, TOPK * COPIES] (copy c: neuron group c of a partial transformation; 2t: 0 Major, 1 Minor);
    returns the dropped slots per element. Thresholds: (T_major, T_minor) at thresholds_ptr, or with PER_DEST
    the row of the rank that owns each slot's sub-expert (index * P + c through owner_ptr; stride_dest floats
    per rank), as ``ep.keep_per_destination``."""
    w = tl.where(live, w, 0.0)
    total = tl.maximum(tl.sum(w, axis=1), 1.1754943508222875e-38)
    score = tl.math.div_rn(w, total[:, None] + tl.zeros_like(w))
    dropped = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for copy in tl.static_range(COPIES):
        column = copy if DROP == 2 else 0  # 2t: the Minor threshold for the Minor half
        if PER_DEST:
            dest = tl.load(owner_ptr + index * P + copy, mask=live, other=0)
            t = tl.load(thresholds_ptr + dest * stride_dest + column, mask=live, other=0.0)
        else:
            t = tl.load(thresholds_ptr + column)
        if DROP == 1:
            keep = score > t
        elif DROP == 2:
            keep = score >= t
        elif DROP == 3:
            top = tl.max(tl.where(live, score, float("-inf")), axis=1)
            keep = score >= t * top[:, None]
        else:  # static top-(k-1): the first lowest-score slot of each token goes
            low = tl.argmin(tl.where(live, score, float("inf")), axis=1, tie_break_left=True)
            keep = ks[None, :] != low[:, None]
        dropped += tl.where(live & (keep == 0), 1, 0)
        keep_out = rows[:, None] * (TOPK * COPIES) + copy * TOPK + ks[None, :]
        tl.store(keep_ptr + keep_out, keep.to(tl.uint8), mask=live)
    return dropped


@triton.jit
def _add_drop_stats(stats_ptr, dropped, mask_t, per_slot, units_per_token):
    """reference.record_drops as two fp64 atomics per program (integer counts: exact)."""
    n_dropped = tl.sum(tl.sum(dropped, axis=1), axis=0)
    n_rows = tl.sum(mask_t.to(tl.int32), axis=0)
    tl.atomic_add(stats_ptr, n_dropped.to(tl.float64) * per_slot)
    tl.atomic_add(stats_ptr + 1, n_rows.to(tl.float64) * units_per_token)


@triton.jit
def keep_per_destination_kernel(weights_ptr, index_ptr, thresholds_ptr, owner_ptr, keep_ptr, stats_ptr,
                                T, P, stride_dest, per_slot, units_per_token,
                                TOPK: tl.constexpr, COPIES: tl.constexpr, DROP: tl.constexpr,
                                HAS_STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert parallelism's keep mask when each pair is judged with its destination rank's thresholds
    (``ep.keep_per_destination``, a load-aware policy's [W, 2]): weights [T, TOPK] as stored, expert ids
    [T, TOPK] (int32), owner [E * P] rank of each sub-expert; keep [T, TOPK * COPIES]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_K)
    mask_t = rows < T
    live = mask_t[:, None] & (ks[None, :] < TOPK)
    at = rows[:, None] * TOPK + ks[None, :]
    w = tl.load(weights_ptr + at, mask=live, other=0.0).to(tl.float32)
    index = tl.load(index_ptr + at, mask=live, other=0)
    dropped = _drop_slots(w, live, ks, rows, keep_ptr, thresholds_ptr, owner_ptr, index, stride_dest, P,
                          TOPK, COPIES, DROP, True, BLOCK_T, BLOCK_K)
    if HAS_STATS:
        _add_drop_stats(stats_ptr, dropped, mask_t, per_slot, units_per_token)
