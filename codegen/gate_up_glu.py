"""Grouped GEMM x @ [gate; up] of each sub-expert with the GLU activation in its epilogue.

Program (pid_m, pid_n) owns BLOCK_SIZE_M sorted rows of one sub-expert s (``schedule.tile_of``) and
BLOCK_SIZE_N of its c = I / P neurons. Sub-expert s is neuron group p = s % P of expert e = s // P:
gate neuron n is weight row GATE_STEP * (p * c + n) and the matching up row is UP_OFFSET further
(concatenated [gate; up]: step 1, offset I; interleaved g0, u0, g1, u1: step 2, offset 1). The rows
are read through the strides of the original 3-D tensor (stride_wn along output channels,
stride_wk along the hidden input), so a transposed [E, H, 2I] layout is the same kernel with the
two strides swapped and no weight is ever copied. Separate 3-D gate and up tensors are the same
kernel with u_ptr on the up tensor and UP_OFFSET 0; per-expert 2-D tensors (a user's ModuleList)
pass tables of the experts' addresses (W_TABLE). The activation rows of x are gathered by token
(pair // PAIRS), never permuted into a copy; h is written in sorted order for the down GEMM.

On Hopper a fused, K-contiguous [gate; up] is read through one tensor descriptor over its
[E, 2, I, K] view (STACKED): each K step loads a gate block and its up block as one
[2 x BLOCK_SIZE_N, BLOCK_SIZE_K] operand and issues one 128 x 256 product instead of two 128 x 128
ones, which reads the x tile from shared memory once instead of twice (benchmarks/gemm_sweep.py,
H100, OLMoE 4096 tokens: 0.475 ms persistent + stacked against 0.564 ms one program per tile, two
operands). The GLU splits the accumulator back into its gate and up halves.

An interleaved fused gate/up (GPT-OSS) is the same idea without the view (PAIRED): the 2 x BLOCK_SIZE_N rows
g_n, u_n, ... of a column block are consecutive, so they are one operand as they stand, and the GLU takes
even accumulator columns as gate and odd ones as up. Stored transposed ([E, H, 2I], GPT-OSS's own layout) it
comes through a descriptor over [E x H, 2I] (W_NMAJOR); reading gate and up apart there strides every load
by two elements (benchmarks/gptoss_layer.py, H200, 4096 tokens: 14.07 ms before, 1.64 ms now).
Only the stacked operand launches persistent prefill tiles: the others run one program per tile
(``schedule.prune_launch_shape``).
"""

import os

import triton
import triton.language as tl

from dsmoe_compiler.codegen.schedule import gemm_config as _cfg
from dsmoe_compiler.codegen.schedule import (PERSISTENT, group_tiles, launch_shapes, locate, pair_weight,
                                             prune_launch_shape, swizzle, tile_of, wide_prefill)


# (MIN_ROWS, MAX_ROWS) = the average rows per group the tile is tried for; two accumulators (gate, up)
# per program, so BLOCK_SIZE_N stays at or under 128. The prefill tiles are the winners of
# benchmarks/gemm_sweep.py on the H100 (results/gemm_sweep.json): 128 x (2 x 128) with 8 warps.
CONFIGS = launch_shapes(
    [_cfg(16, 64, 128, 4, 4, hi=16), _cfg(16, 128, 128, 4, 3, hi=16), _cfg(16, 64, 256, 4, 3, hi=16),
     _cfg(16, 128, 64, 4, 4, hi=64), _cfg(32, 64, 128, 4, 4, lo=16, hi=64), _cfg(64, 64, 64, 4, 4, lo=16, hi=128),
     _cfg(64, 128, 64, 4, 4, lo=32, hi=256)],
    [_cfg(128, 128, 64, 8, 3, lo=64), _cfg(128, 128, 64, 8, 4, lo=64), _cfg(128, 128, 32, 8, 5, lo=128)]
    + wide_prefill((128, 64, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (128, 128, 32, 8, 3),
                   (64, 128, 32, 4, 3)),
    both_for_prefill=True)
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: one small tile keeps tests quick
    CONFIGS = [_cfg(16, 16, 32, 1, 1, group=2, persistent=PERSISTENT == "on")]


@triton.jit
def _glu(gate, up, ACTIVATION: tl.constexpr, CLAMP: tl.constexpr, GATED: tl.constexpr, alpha, limit,
         FAST_SIGMOID: tl.constexpr = False):
    """``reference.expert_glu`` on fp32 products (so ``glu_fp32`` needs nothing here); not GATED: act of the one
    product (``gate`` holds x·W_up)."""
    if not GATED:
        return _activation(gate, ACTIVATION, FAST_SIGMOID)
    if CLAMP == "softcap":  # alpha holds the gate's cap, limit up's (ExpertsSpec.gate_limit, limit)
        return _softcap(gate, alpha) * tl.sigmoid(gate) * _softcap(up, limit)
    if ACTIVATION == "gptoss":
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    if CLAMP != "none":
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if CLAMP == "before":
        gate = tl.minimum(gate, limit)
    act = _activation(gate, ACTIVATION, FAST_SIGMOID)
    if CLAMP == "after":
        act = tl.minimum(act, limit)
    return act * up


@triton.jit
def _softcap(v, cap):
    """cap tanh(v / cap), with tanh(z) = 2 sigmoid(2z) - 1."""
    return cap * (2.0 * tl.sigmoid(2.0 * v / cap) - 1.0)


@triton.jit
def _fast_sigmoid(v):
    """sigmoid(v) = (1 + tanh(v / 2)) / 2 with the GPU's one-instruction tanh (``tanh.approx.f32``, absolute error
    about 2^-11): one special-function operation per element where ``tl.sigmoid`` takes two (exp and reciprocal).
    For 16-bit outputs only (``dispatch.fast_sigmoid``), where it stays under the output's own rounding."""
    t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * v], dtype=tl.float32, is_pure=True,
                                  pack=1)
    return 0.5 * t + 0.5


@triton.jit
def _activation(gate, ACTIVATION: tl.constexpr, FAST_SIGMOID: tl.constexpr = False):
    if ACTIVATION == "silu":
        if FAST_SIGMOID:
            return gate * _fast_sigmoid(gate)
        return gate * tl.sigmoid(gate)
    elif ACTIVATION == "relu":
        return tl.maximum(gate, 0.0)
    elif ACTIVATION == "relu2":
        r = tl.maximum(gate, 0.0)
        return r * r
    elif ACTIVATION == "gelu":
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    else:  # gelu_tanh: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return gate * tl.sigmoid(2.0 * z)


@triton.autotune(configs=CONFIGS,
                 key=["N", "K", "ROWS_BUCKET", "W_DESC", "W_TABLE", "STACKED", "GATED", "DOT_PRECISION",
                      "FAST_SIGMOID"],
                 prune_configs_by={"early_config_prune": prune_launch_shape})
@triton.jit
def gate_up_glu_kernel(
    x_ptr, w_ptr, u_ptr, b_ptr, h_ptr, sorted_ptr, counts_ptr, route_w_ptr,
    N, K, num_subs, pairs, PAIRS, P, UP_OFFSET, TOPK,
    stride_xt, stride_we, stride_wn, stride_wk, stride_be, stride_hm, alpha, limit,
    ROWS_BUCKET, W_ROWS, NUM_PROGRAMS,
    GATE_STEP: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_SUBS: tl.constexpr,
    W_DESC: tl.constexpr, W_TABLE: tl.constexpr, STACKED: tl.constexpr, PAIRED: tl.constexpr, W_NMAJOR: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, MIN_ROWS: tl.constexpr, MAX_ROWS: tl.constexpr, PERSISTENT: tl.constexpr,
    INPUT_WEIGHT: tl.constexpr = False, CLAMP: tl.constexpr = "none", GATED: tl.constexpr = True,
    DOT_PRECISION: tl.constexpr = "tf32", WIDE: tl.constexpr = False, FAST_SIGMOID: tl.constexpr = False,
):
    tiles_n = tl.cdiv(N, BLOCK_SIZE_N)
    g_all, u_all = w_ptr, u_ptr
    if STACKED:  # fused [gate; up] seen as [E, 2, I, K]: a gate block and its up block in one load
        g_all = tl.make_tensor_descriptor(w_ptr, shape=[num_subs // P, 2, UP_OFFSET, K],
                                          strides=[stride_we, UP_OFFSET * stride_wn, stride_wn, 1],
                                          block_shape=[1, 2, BLOCK_SIZE_N, BLOCK_SIZE_K])
    elif PAIRED and W_NMAJOR:  # interleaved [E, K, 2 I] (GPT-OSS): one descriptor over all experts' K rows
        g_all = tl.make_tensor_descriptor(w_ptr, shape=[(num_subs // P) * K, stride_wk], strides=[stride_wk, 1],
                                          block_shape=[BLOCK_SIZE_K, 2 * BLOCK_SIZE_N])
    elif W_DESC and not W_TABLE:  # 3-D weights: one descriptor over all experts' rows, built once per program
        g_all = tl.make_tensor_descriptor(w_ptr, shape=[(num_subs // P) * W_ROWS, K], strides=[stride_wn, 1],
                                          block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
        u_all = tl.make_tensor_descriptor(u_ptr, shape=[(num_subs // P) * W_ROWS, K], strides=[stride_wn, 1],
                                          block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
    if PERSISTENT:
        tiles, tiles_end, counts, starts = group_tiles(counts_ptr, num_subs, BLOCK_SIZE_M, BLOCK_SUBS, GROUPS)
        tiles_m = tl.sum(tiles, 0)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = swizzle(tile, tiles_m, tiles_n, GROUP_SIZE_M)
            sub, row0, rows_left = locate(pid_m, tiles, tiles_end, counts, starts, BLOCK_SIZE_M, BLOCK_SUBS)
            _tile(x_ptr, w_ptr, u_ptr, g_all, u_all, b_ptr, h_ptr, sorted_ptr, route_w_ptr, sub, row0, rows_left,
                  pid_n, N, K, PAIRS, P, UP_OFFSET, TOPK, stride_xt, stride_we, stride_wn, stride_wk, stride_be,
                  stride_hm, alpha, limit, W_ROWS, GATE_STEP, HAS_BIAS, ACTIVATION, W_DESC, W_TABLE, STACKED, PAIRED,
                  W_NMAJOR, GROUPS, INPUT_WEIGHT, CLAMP, GATED, DOT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
                  FAST_SIGMOID)
    else:
        max_tiles_m = tl.cdiv(pairs, BLOCK_SIZE_M) + num_subs  # worst case, see schedule.py
        pid_m, pid_n = swizzle(tl.program_id(0), max_tiles_m, tiles_n, GROUP_SIZE_M)
        sub, row0, rows_left = tile_of(pid_m, counts_ptr, num_subs, BLOCK_SIZE_M, BLOCK_SUBS, GROUPS)
        if sub < num_subs:
            _tile(x_ptr, w_ptr, u_ptr, g_all, u_all, b_ptr, h_ptr, sorted_ptr, route_w_ptr, sub, row0, rows_left,
                  pid_n, N, K, PAIRS, P, UP_OFFSET, TOPK, stride_xt, stride_we, stride_wn, stride_wk, stride_be,
                  stride_hm, alpha, limit, W_ROWS, GATE_STEP, HAS_BIAS, ACTIVATION, W_DESC, W_TABLE, STACKED, PAIRED,
                  W_NMAJOR, GROUPS, INPUT_WEIGHT, CLAMP, GATED, DOT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
                  FAST_SIGMOID)


@triton.jit
def _tile(x_ptr, w_ptr, u_ptr, g_all, u_all, b_ptr, h_ptr, sorted_ptr, route_w_ptr, sub, row0, rows_left, pid_n,
          N, K, PAIRS, P, UP_OFFSET, TOPK,
          stride_xt, stride_we, stride_wn, stride_wk, stride_be, stride_hm, alpha, limit, W_ROWS,
          GATE_STEP: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
          W_DESC: tl.constexpr, W_TABLE: tl.constexpr, STACKED: tl.constexpr, PAIRED: tl.constexpr,
          W_NMAJOR: tl.constexpr, GROUPS: tl.constexpr, INPUT_WEIGHT: tl.constexpr, CLAMP: tl.constexpr,
          GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
          BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
          FAST_SIGMOID: tl.constexpr):
    """h rows [row0, row0 + min(rows_left, BLOCK_SIZE_M)) x neurons of column block pid_n of sub-expert sub.
    GROUPS "halves" (nested halves, ``schedule.group_tiles``): group sub is neuron half sub % 2 of expert
    sub // 2, and h rows are full width I = 2 N, this half's neurons at column (sub % 2) * N."""
    expert = sub // P
    first_neuron = (sub % P) * N

    offs_m = tl.arange(0, BLOCK_SIZE_M)
    mask_m = offs_m < rows_left
    pair = tl.load(sorted_ptr + row0 + offs_m, mask=mask_m, other=0)
    token = pair // PAIRS
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < N
    gate_rows = GATE_STEP * (first_neuron + offs_n)
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    x_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    neuron0 = first_neuron + pid_n * BLOCK_SIZE_N
    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    if STACKED:
        acc_g, acc_u = _stacked(x_ptrs, mask_m, offs_k, g_all, expert, neuron0, K, k_tiles,
                                DOT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
    elif PAIRED:
        acc_g, acc_u = _paired(x_ptrs, mask_m, offs_k, w_ptr, g_all, expert, neuron0, pid_n * BLOCK_SIZE_N, N, K,
                               k_tiles, stride_we, stride_wn, stride_wk, W_NMAJOR,
                               DOT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
    else:
        acc_g, acc_u = _two_operands(x_ptrs, mask_m, offs_k, mask_n, gate_rows, w_ptr, u_ptr, g_all, u_all, expert,
                                     neuron0, K, k_tiles, UP_OFFSET, stride_we, stride_wn, stride_wk, W_ROWS,
                                     W_DESC, W_TABLE, GATED, DOT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N,
                                     BLOCK_SIZE_K)

    if INPUT_WEIGHT:  # Llama-4: the expert sees w x, so both products scale by w before the activation
        w_in = pair_weight(route_w_ptr, pair, mask_m, PAIRS, TOPK)[:, None]
        acc_g *= w_in
        acc_u *= w_in
    if HAS_BIAS:
        b_base = b_ptr + expert * stride_be
        acc_g += tl.load(b_base + gate_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_base + gate_rows + UP_OFFSET, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    h = _glu(acc_g, acc_u, ACTIVATION, CLAMP, GATED, alpha, limit, FAST_SIGMOID)
    h_cols = offs_n
    if GROUPS == "halves":
        h_cols += first_neuron
    h_ptrs = h_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_hm + h_cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _two_operands(x_ptrs, mask_m, offs_k, mask_n, gate_rows, w_ptr, u_ptr, g_all, u_all, expert, neuron0,
                  K, k_tiles, UP_OFFSET, stride_we, stride_wn, stride_wk, W_ROWS,
                  W_DESC: tl.constexpr, W_TABLE: tl.constexpr, GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """(gate, up) accumulators from two weight operands per K step: pointers (any strides), a descriptor per
    expert (W_TABLE), or the descriptor over all experts. Not GATED: the first operand only (up stays zero)."""
    if W_TABLE:  # one 2-D tensor per expert: their addresses come from a table
        g_base = tl.load(w_ptr + expert).to(tl.pointer_type(x_ptrs.dtype.element_ty))
        u_base = tl.load(u_ptr + expert).to(tl.pointer_type(x_ptrs.dtype.element_ty))
    else:
        g_base = w_ptr + expert.to(tl.int64) * stride_we
        u_base = u_ptr + expert.to(tl.int64) * stride_we
    g_ptrs = g_base + offs_k[:, None] * stride_wk + gate_rows[None, :] * stride_wn
    u_ptrs = u_base + offs_k[:, None] * stride_wk + (gate_rows + UP_OFFSET)[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    # weight tiles by the tensor-memory accelerator, K contiguous; rows past this sub-expert's neurons
    # (the next sub-expert's, or zeros past the matrix) are computed and never stored
    g_row = neuron0
    if W_DESC:
        if W_TABLE:  # a descriptor over this expert's own [W_ROWS, K] matrix
            g_all = tl.make_tensor_descriptor(g_base, shape=[W_ROWS, K], strides=[stride_wn, 1],
                                              block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
            u_all = tl.make_tensor_descriptor(u_base, shape=[W_ROWS, K], strides=[stride_wn, 1],
                                              block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
        else:  # the descriptor over all experts: this expert's rows start at expert * W_ROWS
            g_row += expert * W_ROWS
    for k in range(0, k_tiles):
        k_left = K - k * BLOCK_SIZE_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if W_DESC:
            wg = g_all.load([g_row, k * BLOCK_SIZE_K]).T
        else:
            wg = tl.load(g_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PRECISION)
        if GATED:
            if W_DESC:
                wu = u_all.load([g_row + UP_OFFSET, k * BLOCK_SIZE_K]).T
            else:
                wu = tl.load(u_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_SIZE_K
        g_ptrs += BLOCK_SIZE_K * stride_wk
        u_ptrs += BLOCK_SIZE_K * stride_wk
    return acc_g, acc_u


@triton.jit
def _paired(x_ptrs, mask_m, offs_k, w_ptr, w_desc, expert, neuron0, first_col, N, K, k_tiles,
            stride_we, stride_wn, stride_wk, W_NMAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """(gate, up) accumulators of an interleaved fused weight (g0, u0, g1, u1, ...: GPT-OSS): the 2 x BLOCK_SIZE_N
    consecutive rows of this column block are one operand, read whole (contiguous along them in the transposed
    layout, so the loads vectorise, where reading gate and up apart strides by 2), and each K step is one
    BLOCK_SIZE_M x 2 BLOCK_SIZE_N product; even accumulator columns are gate, odd ones up. W_NMAJOR: the block comes
    by the tensor-memory accelerator from the descriptor over [E x K, 2 I] (K rows past this expert's meet x
    columns masked to zero; columns past the matrix read as zeros)."""
    offs_2n = tl.arange(0, 2 * BLOCK_SIZE_N)
    live = first_col + offs_2n // 2 < N
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
              + (2 * neuron0 + offs_2n)[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_SIZE_M, 2 * BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, k_tiles):
        k_live = offs_k < K - k * BLOCK_SIZE_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & k_live[None, :], other=0.0)
        if W_NMAJOR:
            w = w_desc.load([expert * K + k * BLOCK_SIZE_K, 2 * neuron0])
        else:
            w = tl.load(w_ptrs, mask=k_live[:, None] & live[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K * stride_wk
    return acc.reshape(BLOCK_SIZE_M, BLOCK_SIZE_N, 2).split()


@triton.jit
def _stacked(x_ptrs, mask_m, offs_k, gu_desc, expert, neuron0, K, k_tiles, DOT_PRECISION: tl.constexpr,
             BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """(gate, up) accumulators of a fused [gate; up] read through its [E, 2, I, K] view: the gate block and
    the up block arrive as one [2 x BLOCK_SIZE_N, BLOCK_SIZE_K] operand, so each K step is one
    BLOCK_SIZE_M x 2 BLOCK_SIZE_N product that reads the x tile once (a 128 x 256 tile, like the down GEMM's)."""
    acc = tl.zeros((BLOCK_SIZE_M, 2 * BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, k_tiles):
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k * BLOCK_SIZE_K), other=0.0)
        w = gu_desc.load([expert, 0, neuron0, k * BLOCK_SIZE_K]).reshape(2 * BLOCK_SIZE_N, BLOCK_SIZE_K)
        acc = tl.dot(a, w.T, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_SIZE_K
    return acc.reshape(BLOCK_SIZE_M, 2, BLOCK_SIZE_N).permute(0, 2, 1).split()
