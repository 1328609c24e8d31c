"""The MoE operator as Triton kernels: route → group pairs → gate/up+GLU → down×weight → combine.

``moe_triton(x, params, spec)`` returns what ``reference.moe(x, params, spec)`` returns (within
floating-point tolerance). Every buffer is sized for the worst case (all T * K * P pairs kept, one
partial tile per sub-expert), so nothing reads a count back to the host: one forward is a fixed
sequence of launches that a CUDA graph can capture.

Launches: router GEMM (cuBLAS) → ``topk_route`` → zero the counts → ``align.count`` →
``align.scatter`` → ``gate_up_glu`` → ``down_weighted`` → ``combine`` (+ shared experts in torch).
"""

from __future__ import annotations

import torch
import triton

from dsmoe_compiler.codegen import reference
from dsmoe_compiler.codegen.align import count_kernel, scatter_kernel
from dsmoe_compiler.codegen.combine import combine_kernel
from dsmoe_compiler.codegen.down_weighted import down_weighted_kernel
from dsmoe_compiler.codegen.gate_up_glu import gate_up_glu_kernel
from dsmoe_compiler.codegen.schedule import rows_bucket
from dsmoe_compiler.codegen.topk_route import topk_route_kernel
from dsmoe_compiler.ir import MoESpec

BLOCK_PAIRS = 1024  # pairs per program of the alignment kernels


def _empty(shape, dtype, device):
    """Every scratch and output buffer comes from here, so tests can poison them (NaN / -1) instead."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fused_routing_ok(spec: MoESpec) -> bool:
    r = spec.routing
    complete = spec.transform == "complete" and spec.partition > 1
    # GPT-OSS takes top-k of raw (bf16) logits, where exact ties are common: torch.topk breaks them the
    # way the model does (measured: 2.3 % logits error on a tiny bf16 GPT-OSS with our kernel's order).
    return r.num_groups == 1 and not complete and not r.score_after_topk and spec.num_experts <= 1024


def route(x: torch.Tensor, params, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K'], routed index [T, K'] int32) with K' = top_k (or top_k * P, complete transform)."""
    if not _fused_routing_ok(spec):
        _, weights, index = reference.route(x, params, spec)
        return weights, index.to(torch.int32)
    r = spec.routing
    logits = reference.router_logits(x, params, spec)
    T, E, K = x.shape[0], spec.num_experts, spec.top_k
    weights = _empty((T, K), torch.float32 if r.weights_fp32 else x.dtype, x.device)
    index = _empty((T, K), torch.int32, x.device)
    score_bias = reference._param(spec, params, "score_bias")
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, 4096 // block_e))
    topk_route_kernel[(triton.cdiv(T, block_t),)](
        logits, score_bias if score_bias is not None else logits, weights, index, T, E, logits.stride(0),
        r.renorm_eps, r.scale, TOPK=K, SIGMOID=r.score_func == "sigmoid", AFTER_TOPK=r.score_after_topk,
        RENORM=r.renormalize, HAS_SCORE_BIAS=r.score_bias, ROUND_SCORES=logits.dtype != torch.float32,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(K))
    return weights, index


def align(index: torch.Tensor, keep: torch.Tensor | None, num_subs: int, expand: int):
    """(sorted pair ids [pairs], counts [num_subs]) for pairs = T * K' * expand; see align.py."""
    T, topk = index.shape
    pairs_per_token = topk * expand
    pairs = T * pairs_per_token
    counts = torch.zeros(num_subs, dtype=torch.int32, device=index.device)
    rank = _empty((max(pairs, 1),), torch.int32, index.device)
    sorted_ids = _empty((max(pairs, 1),), torch.int32, index.device)
    keep_arg = keep if keep is not None else index
    grid = (triton.cdiv(pairs, BLOCK_PAIRS),)
    if pairs:
        count_kernel[grid](index, keep_arg, counts, rank, pairs, topk, pairs_per_token, expand,
                           HAS_KEEP=keep is not None, BLOCK_PAIRS=BLOCK_PAIRS)
        scatter_kernel[grid](index, keep_arg, counts, rank, sorted_ids, pairs, topk, pairs_per_token, expand,
                             num_subs, HAS_KEEP=keep is not None, BLOCK_PAIRS=BLOCK_PAIRS,
                             BLOCK_SUBS=triton.next_power_of_2(num_subs))
    return sorted_ids, counts


def _layout(spec: MoESpec, params):
    """gate_up / down tensors with (stride over experts, over output channels, over input channels)."""
    ex = spec.experts
    gate_up, down = reference._param(spec, params, "gate_up"), reference._param(spec, params, "down")
    gu = (gate_up.stride(0), gate_up.stride(2), gate_up.stride(1)) if ex.transposed else gate_up.stride()
    dn = (down.stride(0), down.stride(2), down.stride(1)) if ex.transposed else down.stride()
    return gate_up, gu, down, dn


def experts(x, weights, index, params, spec: MoESpec, keep=None) -> torch.Tensor:
    """Routed experts on pairs of index [T, K'] (expanded P times for a partial transformation)."""
    T, H = x.shape
    expand = spec.partition if spec.transform == "partial" else 1
    P, ex = spec.partition, spec.experts
    num_subs, c = spec.num_experts * P, spec.intermediate // P
    topk = index.shape[1]
    pairs_per_token = topk * expand
    pairs = T * pairs_per_token
    out = _empty((T, H), x.dtype, x.device)
    if pairs == 0:
        return out.zero_()
    sorted_ids, counts = align(index, keep, num_subs, expand)
    gate_up, gu_strides, down, dn_strides = _layout(spec, params)
    gub, db = reference._param(spec, params, "gate_up_bias"), reference._param(spec, params, "down_bias")
    bucket = rows_bucket(pairs, num_subs)
    block_subs = triton.next_power_of_2(num_subs)

    h = _empty((pairs, c), x.dtype, x.device)
    def tiles_m(meta):  # worst case: every pair kept, one partial tile per sub-expert
        return triton.cdiv(pairs, meta["BLOCK_SIZE_M"]) + num_subs
    gate_up_glu_kernel[lambda meta: (tiles_m(meta) * triton.cdiv(c, meta["BLOCK_SIZE_N"]),)](
        x, gate_up, gub if gub is not None else gate_up, h, sorted_ids, counts,
        c, H, num_subs, pairs, pairs_per_token, P, 1 if ex.interleaved else spec.intermediate,
        x.stride(0), *gu_strides, gub.stride(0) if gub is not None else 0, h.stride(0), ex.alpha, ex.limit,
        bucket, GATE_STEP=2 if ex.interleaved else 1, HAS_BIAS=gub is not None, ACTIVATION=ex.activation,
        BLOCK_SUBS=block_subs)

    y = _empty((pairs, H), x.dtype, x.device)
    down_weighted_kernel[lambda meta: (tiles_m(meta) * triton.cdiv(H, meta["BLOCK_SIZE_N"]),)](
        h, down, db if db is not None else down, weights, y, sorted_ids, counts,
        H, c, num_subs, pairs, pairs_per_token, topk, P,
        h.stride(0), *dn_strides, db.stride(0) if db is not None else 0, y.stride(0),
        bucket, HAS_BIAS=db is not None, BLOCK_SUBS=block_subs)

    block_h = min(1024, triton.next_power_of_2(H))
    combine_kernel[(T, triton.cdiv(H, block_h))](
        y, keep if keep is not None else counts, out, H, pairs_per_token, y.stride(0), out.stride(0),
        HAS_KEEP=keep is not None, BLOCK_SIZE_H=block_h)
    return out


def _reference_with_keep(x, params, spec: MoESpec, keep):
    _, weights, index = reference.route(x, params, spec)
    if spec.transform == "partial":
        index, weights = reference.partial_transform(index, weights, spec.partition)
    out = reference.experts(x, index, weights, params, spec, keep=keep)
    return out + reference.shared_experts(x, params, spec) if spec.shared is not None else out


def moe_triton(x: torch.Tensor, params, spec: MoESpec, keep: torch.Tensor | None = None, *,
               thresholds: torch.Tensor | None = None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """The whole MoE block on x [T, H]; keep [T, K*P] (bool) marks the pairs a drop pass kept.

    With ``spec.drop`` on, ``keep`` comes from ``reference.keep_mask`` on the routed weights and the
    block's device-side ``thresholds`` (and ``stats`` are accumulated on the device): no host sync.
    """
    if spec.experts.layout != "fused":  # NOTE: list / separate weights still run the reference loop
        if keep is None:
            return reference.moe(x, params, spec, thresholds, stats)
        return _reference_with_keep(x, params, spec, keep)
    x = x.contiguous()
    weights, index = route(x, params, spec)
    if spec.drop.mode != "none" and thresholds is not None:
        keep = reference.keep_mask(weights, spec, thresholds)
        if stats is not None:
            reference.record_drops(stats, keep, spec)
    if keep is not None:  # bytes, not torch.bool: the interpreter rejects masks built from loaded bools
        keep = keep.contiguous().view(torch.uint8)
    out = experts(x, weights, index, params, spec, keep)
    if spec.shared is not None:
        out = out + reference.shared_experts(x, params, spec)
    return out
