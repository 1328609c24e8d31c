"""Router scores, top-k, renormalisation and scale of a block of tokens in one kernel.

Replaces reference.route's chain of softmax / topk / gather / sum / div / mul / cast (about ten
launches) after the router GEMM. Covers score_func softmax or sigmoid, score_after_topk (GPT-OSS),
score_bias (selection only), renormalize with eps, scale; group-limited routing and the complete
transformation stay on reference.route (``dispatch.py`` decides). Top-k is k rounds of argmax;
ties go to the lowest expert id.
"""

import triton
import triton.language as tl


@triton.jit
def topk_route_kernel(
    logits_ptr, score_bias_ptr, weights_ptr, index_ptr, T, E, stride_lt, renorm_eps, scale,
    TOPK: tl.constexpr, SIGMOID: tl.constexpr, AFTER_TOPK: tl.constexpr, RENORM: tl.constexpr,
    HAS_SCORE_BIAS: tl.constexpr, ROUND_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
            picked = picked / (total + renorm_eps)[:, None]
        picked = picked * scale
    out = rows[:, None] * TOPK + ks[None, :]
    store_mask = mask_t[:, None] & live_k
    tl.store(weights_ptr + out, picked.to(weights_ptr.dtype.element_ty), mask=store_mask)
    tl.store(index_ptr + out, picked_idx, mask=store_mask)
