"""Grouped GEMM h @ down of each sub-expert, routing weight applied in the epilogue, one row per pair.

Program (pid_m, pid_n) owns BLOCK_SIZE_M sorted rows of sub-expert s and BLOCK_SIZE_N hidden
channels. The down weight of neuron group p of expert e is the [H, c] column slice starting at
p * c of down[e] (or the row slice of a transposed [I, H] layout), read through the original strides:
by a descriptor over all experts' [H, I] rows when K-contiguous (W_DESC), over their [I, H] rows when
transposed (W_NMAJOR, GPT-OSS), else by pointer loads.
The down bias belongs to the whole expert, so only sub-expert p == 0 adds it (as the reference does).
Each result row, scaled by its pair's routing weight, goes to its own row of the pair buffer
[T * PAIRS, H]; ``combine.py`` then sums a token's rows in a fixed order (deterministic, no atomics).
"""

import os

import triton
import triton.language as tl

from dsmoe_compiler.codegen.schedule import gemm_config as _cfg
from dsmoe_compiler.codegen.schedule import (PERSISTENT, group_tiles, halves_of, launch_shapes, locate, pair_weight,
                                             prune_by_rows, swizzle, tile_of, wide_prefill)


# (MIN_ROWS, MAX_ROWS) = the average rows per group the tile is tried for; prefill tiles chosen by
# benchmarks/gemm_sweep.py on the H100 (results/gemm_sweep.json).
CONFIGS = launch_shapes(
    [_cfg(16, 64, 128, 4, 4, hi=16), _cfg(16, 128, 128, 4, 3, hi=16), _cfg(16, 64, 256, 4, 3, hi=16),
     _cfg(16, 128, 64, 4, 4, hi=64), _cfg(32, 128, 64, 4, 4, lo=16, hi=64), _cfg(64, 128, 64, 4, 4, lo=16, hi=128),
     _cfg(64, 256, 64, 8, 3, lo=32, hi=256)],
    [_cfg(128, 256, 64, 8, 3, lo=64), _cfg(128, 256, 64, 8, 4, lo=64), _cfg(128, 256, 32, 8, 5, lo=128)]
    + wide_prefill((128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 256, 32, 8, 3)))
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: one small tile keeps tests quick
    CONFIGS = [_cfg(16, 32, 16, 1, 1, group=2, persistent=PERSISTENT == "on")]


@triton.autotune(configs=CONFIGS, key=["N", "K", "ROWS_BUCKET", "W_DESC", "W_TABLE", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_by_rows})
@triton.jit
def down_weighted_kernel(
    h_ptr, w_ptr, b_ptr, route_w_ptr, y_ptr, sorted_ptr, counts_ptr,
    N, K, num_subs, pairs, PAIRS, TOPK, P,
    stride_hm, stride_we, stride_wn, stride_wk, stride_be, stride_yp,
    ROWS_BUCKET, W_ROWS, W_COLS, NUM_PROGRAMS, HALF,
    HAS_BIAS: tl.constexpr, BLOCK_SUBS: tl.constexpr, W_DESC: tl.constexpr, W_NMAJOR: tl.constexpr,
    W_TABLE: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, MIN_ROWS: tl.constexpr, MAX_ROWS: tl.constexpr, PERSISTENT: tl.constexpr,
    OUTPUT_WEIGHT: tl.constexpr = True, DOT_PRECISION: tl.constexpr = "tf32", WIDE: tl.constexpr = False,
):
    tiles_n = tl.cdiv(N, BLOCK_SIZE_N)
    w_all = w_ptr
    if W_NMAJOR:  # [E, I, H] (transposed, GPT-OSS): one descriptor over all experts' I rows of H channels
        w_all = tl.make_tensor_descriptor(w_ptr, shape=[(num_subs // P) * W_COLS, stride_wk], strides=[stride_wk, 1],
                                          block_shape=[BLOCK_SIZE_K, BLOCK_SIZE_N])
    elif W_DESC and not W_TABLE:  # 3-D weights: one descriptor over all experts' rows, built once per program
        w_all = tl.make_tensor_descriptor(w_ptr, shape=[(num_subs // P) * W_ROWS, W_COLS], strides=[stride_wn, 1],
                                          block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
    if PERSISTENT:
        tiles, tiles_end, counts, starts = group_tiles(counts_ptr, num_subs, BLOCK_SIZE_M, BLOCK_SUBS, GROUPS)
        tiles_m = tl.sum(tiles, 0)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = swizzle(tile, tiles_m, tiles_n, GROUP_SIZE_M)
            sub, row0, rows_left = locate(pid_m, tiles, tiles_end, counts, starts, BLOCK_SIZE_M, BLOCK_SUBS)
            major_left, minor_from = halves_of(counts_ptr, sub, num_subs, rows_left, GROUPS)
            _tile(h_ptr, w_ptr, w_all, b_ptr, route_w_ptr, y_ptr, sorted_ptr, sub, row0, rows_left, pid_n,
                  major_left, minor_from, HALF,
                  N, K, PAIRS, TOPK, P, stride_hm, stride_we, stride_wn, stride_wk, stride_be, stride_yp,
                  W_ROWS, W_COLS, HAS_BIAS, W_DESC, W_NMAJOR, W_TABLE, GROUPS, OUTPUT_WEIGHT, DOT_PRECISION,
                  BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
    else:
        max_tiles_m = tl.cdiv(pairs, BLOCK_SIZE_M) + num_subs  # worst case, see schedule.py
        pid_m, pid_n = swizzle(tl.program_id(0), max_tiles_m, tiles_n, GROUP_SIZE_M)
        sub, row0, rows_left = tile_of(pid_m, counts_ptr, num_subs, BLOCK_SIZE_M, BLOCK_SUBS, GROUPS)
        if sub < num_subs:
            major_left, minor_from = halves_of(counts_ptr, sub, num_subs, rows_left, GROUPS)
            _tile(h_ptr, w_ptr, w_all, b_ptr, route_w_ptr, y_ptr, sorted_ptr, sub, row0, rows_left, pid_n,
                  major_left, minor_from, HALF,
                  N, K, PAIRS, TOPK, P, stride_hm, stride_we, stride_wn, stride_wk, stride_be, stride_yp,
                  W_ROWS, W_COLS, HAS_BIAS, W_DESC, W_NMAJOR, W_TABLE, GROUPS, OUTPUT_WEIGHT, DOT_PRECISION,
                  BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)


@triton.jit
def _tile(h_ptr, w_ptr, w_all, b_ptr, route_w_ptr, y_ptr, sorted_ptr, sub, row0, rows_left, pid_n,
          major_left, minor_from, HALF, N, K, PAIRS, TOPK, P,
          stride_hm, stride_we, stride_wn, stride_wk, stride_be, stride_yp, W_ROWS, W_COLS,
          HAS_BIAS: tl.constexpr, W_DESC: tl.constexpr, W_NMAJOR: tl.constexpr, W_TABLE: tl.constexpr,
          GROUPS: tl.constexpr, OUTPUT_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
          BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """y rows of the pairs in sorted rows [row0, row0 + min(rows_left, BLOCK_SIZE_M)) x channel block pid_n.
    GROUPS "nested": h columns below HALF (the Major half) count for the first major_left rows only, those from HALF
    on (the Minor half) for the rows from minor_from on; K steps no row needs are skipped."""
    expert = sub // P
    part = sub % P

    offs_m = tl.arange(0, BLOCK_SIZE_M)
    mask_m = offs_m < rows_left
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    h_ptrs = h_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    if W_TABLE:  # one 2-D tensor per expert: their addresses come from a table
        w_base = tl.load(w_ptr + expert).to(tl.pointer_type(h_ptr.dtype.element_ty))
    else:
        w_base = w_ptr + expert.to(tl.int64) * stride_we
    w_ptrs = w_base + offs_n[None, :] * stride_wn + (part * K + offs_k)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    # Weight tiles by the tensor-memory accelerator, K contiguous. Columns past K belong to the next neuron
    # group (or read as zeros past the matrix) and rows past N to the next expert; they meet h columns
    # masked to zero or land in channels never stored, so they add nothing.
    w_row = pid_n * BLOCK_SIZE_N
    if W_DESC:
        if W_TABLE:  # a descriptor over this expert's own [W_ROWS, W_COLS] matrix
            w_all = tl.make_tensor_descriptor(w_base, shape=[W_ROWS, W_COLS], strides=[stride_wn, 1],
                                              block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
        else:  # the descriptor over all experts: this expert's rows start at expert * W_ROWS
            w_row += expert * W_ROWS
    k_first, k_end = 0, tl.cdiv(K, BLOCK_SIZE_K)
    if GROUPS == "nested":
        k_first = tl.where(major_left > 0, 0, HALF // BLOCK_SIZE_K)
        k_end = tl.where(minor_from < tl.minimum(rows_left, BLOCK_SIZE_M), k_end, tl.cdiv(HALF, BLOCK_SIZE_K))
        h_ptrs += k_first * BLOCK_SIZE_K
        w_ptrs += k_first * BLOCK_SIZE_K * stride_wk
    for k in range(k_first, k_end):
        k_left = K - k * BLOCK_SIZE_K
        live = mask_m[:, None] & (offs_k[None, :] < k_left)
        if GROUPS == "nested":
            major = (k * BLOCK_SIZE_K + offs_k) < HALF
            live = live & ((major[None, :] & (offs_m < major_left)[:, None])
                           | ((~major)[None, :] & (offs_m >= minor_from)[:, None]))
        a = tl.load(h_ptrs, mask=live, other=0.0)
        if W_NMAJOR:  # K rows past this expert's meet h columns masked to zero
            w = w_all.load([expert * W_COLS + part * K + k * BLOCK_SIZE_K, pid_n * BLOCK_SIZE_N])
        elif W_DESC:
            w = w_all.load([w_row, part * K + k * BLOCK_SIZE_K]).T
        else:
            w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K * stride_wk

    if HAS_BIAS:  # the expert's bias rides with its Major half (sub-expert p == 0), as in the reference
        bias = tl.load(b_ptr + expert * stride_be + offs_n, mask=mask_n & (offs_n * 0 + part == 0), other=0.0)
        if GROUPS == "nested":
            acc += tl.where((offs_m < major_left)[:, None], bias.to(tl.float32)[None, :], 0.0)
        else:
            acc += bias.to(tl.float32)[None, :]
    pair = tl.load(sorted_ptr + row0 + offs_m, mask=mask_m, other=0)
    if OUTPUT_WEIGHT:  # off where the gate/up applied it to the input (Llama-4)
        acc *= pair_weight(route_w_ptr, pair, mask_m, PAIRS, TOPK)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
