"""Hopper gate/up grouped GEMM written out by hand in Gluon: warp-specialised, with 64-row half tiles.

The Triton kernel (``gate_up_glu.py``) issues every 128 x 256 product from the same eight warps that
wait on the loads and run the epilogue, and a group's last M-tile runs all 128 rows even when only a
few are filled (about a tenth of OLMoE's M-tiles at 4096 tokens, a fifth of Qwen3-30B-A3B's). Here
the roles are separate warp groups of one persistent program per SM:

- a loader warp group gathers the tile's x rows by token with ``cp.async`` into two 64-row halves of
  a stage, each thread arriving on the stage's ``a_ready`` barrier when its copies land, and brings
  the gate block and the matching up block of the expert by TMA (``b_ready``);
- two MMA warp groups each own one 64-row half of the 128-row tile and issue 64 x 256 products
  (gate and up stacked, one product per K step, x read once), then the GLU epilogue of their half.
  A half with no rows skips its products: the last M-tile of a group costs what its rows need.

Both consumers release a stage on ``empty`` when their products that read it are done. Only the
plain case is written: fused [gate; up] weights, K-contiguous, bf16/fp16, P = 1, SwiGLU, no bias,
hidden size a multiple of BLOCK_K. ``gluon_gate_up_supported`` says when it applies.
Equivalence: h = silu(x W_g^T) * (x W_u^T) per sorted row, the same as ``gate_up_glu_kernel``;
checked against it in ``benchmarks/gluon_gate_up.py`` and ``tests/test_gpu_launch.py``.
"""

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

HALF_M = 64  # rows per MMA warp group; a tile is two halves
LOADER_WARPS = 4


@triton.jit
def tile_table_kernel(counts_ptr, table_ptr, num_tiles_ptr, num_groups, max_tiles,
                      BLOCK_M: tl.constexpr, BLOCK_SUBS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows (group, first sorted row, rows of the group left from there) of M-tiles [pid * BLOCK_T, ...),
    and the number of M-tiles: the schedule both Gluon partitions walk, computed once on the device."""
    g = tl.arange(0, BLOCK_SUBS)
    counts = tl.load(counts_ptr + g, mask=g < num_groups, other=0)
    starts = tl.cumsum(counts, 0) - counts
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    m = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    group = tl.sum((ends[None, :] <= m[:, None]).to(tl.int32), 1)
    mine = g[None, :] == group[:, None]
    first = tl.sum(tl.where(mine, (ends - tiles)[None, :], 0), 1)
    start = tl.sum(tl.where(mine, starts[None, :], 0), 1)
    count = tl.sum(tl.where(mine, counts[None, :], 0), 1)
    local = (m - first) * BLOCK_M
    ok = m < max_tiles
    tl.store(table_ptr + 3 * m, group, mask=ok)
    tl.store(table_ptr + 3 * m + 1, start + local, mask=ok)
    tl.store(table_ptr + 3 * m + 2, count - local, mask=ok)
    if tl.program_id(0) == 0:
        tl.store(num_tiles_ptr, tl.sum(tiles, 0))


@gluon.jit
def _tile(t, table_ptr, tiles_m, tiles_n, GROUP_SIZE_M: gl.constexpr):
    """(expert, first sorted row, rows left, column block) of tile t, in the Triton kernels' grouped order."""
    width = GROUP_SIZE_M * tiles_n
    first_m = (t // width) * GROUP_SIZE_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (t % width) % size_m
    pid_n = (t % width) // size_m
    expert = gl.load(table_ptr + 3 * pid_m)
    row0 = gl.load(table_ptr + 3 * pid_m + 1)
    rows = gl.load(table_ptr + 3 * pid_m + 2)
    return expert, row0, rows, pid_n


@gluon.jit
def _loader(x_ptr, w_desc, sorted_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty,
            stride_xt, I, K, PAIRS, tiles_n, NUM_PROGRAMS, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
            STAGES: gl.constexpr, GROUP_SIZE_M: gl.constexpr):
    """Per stage: the tile's x rows gathered by token with cp.async into two [64, BLOCK_K] halves (rows past
    the group read nothing), and the expert's gate block and up block by TMA as one [2 BLOCK_N, BLOCK_K]."""
    HALF: gl.constexpr = 64
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    offs_r = gl.arange(0, HALF, layout=gl.SliceLayout(1, layout))
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    tiles_m = gl.load(num_tiles_ptr)
    k_tiles = K // BLOCK_K
    it = 0
    for t in range(gl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS):
        expert, row0, rows, pid_n = _tile(t, table_ptr, tiles_m, tiles_n, GROUP_SIZE_M)
        gate_row = expert * 2 * I + pid_n * BLOCK_N
        live0 = offs_r < rows
        live1 = offs_r + HALF < rows
        tok0 = gl.load(sorted_ptr + row0 + offs_r, mask=live0, other=0) // PAIRS
        tok1 = gl.load(sorted_ptr + row0 + HALF + offs_r, mask=live1, other=0) // PAIRS
        p0 = x_ptr + tok0.to(gl.int64)[:, None] * stride_xt + offs_k[None, :]
        p1 = x_ptr + tok1.to(gl.int64)[:, None] * stride_xt + offs_k[None, :]
        for k in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            async_copy.async_copy_global_to_shared(a_bufs.index(2 * s), p0 + k * BLOCK_K, mask=live0[:, None])
            async_copy.async_copy_global_to_shared(a_bufs.index(2 * s + 1), p1 + k * BLOCK_K, mask=live1[:, None])
            async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
            bar = b_ready.index(s)
            mbarrier.expect(bar, 2 * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [gate_row, k * BLOCK_K], bar, b_bufs.index(s).slice(0, BLOCK_N))
            tma.async_copy_global_to_shared(w_desc, [gate_row + I, k * BLOCK_K], bar,
                                            b_bufs.index(s).slice(BLOCK_N, BLOCK_N))
            it += 1


@gluon.jit
def _mma_half(h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K, tiles_n,
              NUM_PROGRAMS, HALF_INDEX: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              STAGES: gl.constexpr, GROUP_SIZE_M: gl.constexpr, EPI_BLOCKED: gl.constexpr, PREFETCH: gl.constexpr):
    """Rows [HALF_INDEX * 64, +64) of every tile: 64 x 2 BLOCK_N products, then h = silu(gate) * up."""
    HALF: gl.constexpr = 64
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 2 * BLOCK_N, 16])
    tiles_m = gl.load(num_tiles_ptr)
    total = tiles_m * tiles_n
    k_tiles = K // BLOCK_K
    it = 0
    last = gl.maximum(total - 1, 0)
    expert, row0, rows, pid_n = _tile(gl.minimum(gl.program_id(0), last), table_ptr, tiles_m, tiles_n, GROUP_SIZE_M)
    for t in range(gl.program_id(0), total, NUM_PROGRAMS):
        if not PREFETCH:
            expert, row0, rows, pid_n = _tile(t, table_ptr, tiles_m, tiles_n, GROUP_SIZE_M)
        # the next tile's row range, loaded now so its latency hides behind this tile's products
        n_expert, n_row0, n_rows, n_pid_n = _tile(gl.minimum(t + NUM_PROGRAMS, last), table_ptr, tiles_m, tiles_n,
                                                  GROUP_SIZE_M)
        my_rows = rows - HALF_INDEX * HALF
        if my_rows > 0:
            acc = gl.zeros((HALF, 2 * BLOCK_N), gl.float32, acc_layout)
            for k in range(k_tiles):
                s = it % STAGES
                phase = (it // STAGES) & 1
                mbarrier.wait(a_ready.index(s), phase)
                mbarrier.wait(b_ready.index(s), phase)
                fence_async_shared()  # cp.async wrote through the generic proxy; wgmma reads through the async one
                acc = warpgroup_mma(a_bufs.index(2 * s + HALF_INDEX), b_bufs.index(s).permute((1, 0)), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc, ))
                # the product of the previous step is done: its stage can be refilled
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=k > 0)
                it += 1
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
            gate, up = acc.reshape([HALF, 2, BLOCK_N]).permute(0, 2, 1).split()
            h = (gate / (1.0 + gl.exp(-gate)) * up).to(h_ptr.dtype.element_ty)
            if EPI_BLOCKED:  # 16-byte row segments per thread instead of the accumulator's 4-byte pairs
                h = gl.convert_layout(h, gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0]))
            offs_r = gl.arange(0, HALF, layout=gl.SliceLayout(1, h.type.layout))
            offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, h.type.layout))
            row = row0 + HALF_INDEX * HALF + offs_r
            ptrs = h_ptr + row.to(gl.int64)[:, None] * stride_hm + (pid_n * BLOCK_N + offs_n)[None, :]
            gl.store(ptrs, h, mask=(offs_r < my_rows)[:, None])
        else:  # nothing to compute; the stages still have to be released in order
            for k in range(k_tiles):
                s = it % STAGES
                phase = (it // STAGES) & 1
                mbarrier.wait(a_ready.index(s), phase)
                mbarrier.wait(b_ready.index(s), phase)
                mbarrier.arrive(empty.index(s))
                it += 1
        expert, row0, rows, pid_n = n_expert, n_row0, n_rows, n_pid_n


@gluon.jit
def _mma_half0(h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K, tiles_n,
               NUM_PROGRAMS, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
               GROUP_SIZE_M: gl.constexpr, EPI_BLOCKED: gl.constexpr, PREFETCH: gl.constexpr):
    _mma_half(h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K, tiles_n,
              NUM_PROGRAMS, 0, BLOCK_N, BLOCK_K, STAGES, GROUP_SIZE_M, EPI_BLOCKED, PREFETCH)


@gluon.jit
def _mma_half1(h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K, tiles_n,
               NUM_PROGRAMS, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
               GROUP_SIZE_M: gl.constexpr, EPI_BLOCKED: gl.constexpr, PREFETCH: gl.constexpr):
    _mma_half(h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K, tiles_n,
              NUM_PROGRAMS, 1, BLOCK_N, BLOCK_K, STAGES, GROUP_SIZE_M, EPI_BLOCKED, PREFETCH)


@gluon.jit
def gluon_gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ptr, table_ptr, num_tiles_ptr,
                         num_experts, I, K, PAIRS, stride_xt, stride_wn, stride_hm, NUM_PROGRAMS,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                         GROUP_SIZE_M: gl.constexpr, MMA_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                         EPI_BLOCKED: gl.constexpr, PREFETCH: gl.constexpr, num_warps: gl.constexpr):
    HALF: gl.constexpr = 64
    dtype: gl.constexpr = w_ptr.dtype.element_ty
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BLOCK_K], dtype)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * BLOCK_N, BLOCK_K], dtype)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
    w_desc = tma.make_tensor_descriptor(w_ptr, shape=[num_experts * 2 * I, K], strides=[stride_wn, 1],
                                        block_shape=[BLOCK_N, BLOCK_K], layout=w_layout)
    a_bufs = gl.allocate_shared_memory(dtype, [2 * STAGES, HALF, BLOCK_K], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, 2 * BLOCK_N, BLOCK_K], b_layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=32 * 4)  # one cp.async arrival per A-loader thread
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both MMA warp groups
    tiles_n = I // BLOCK_N
    gl.warp_specialize([
        (_mma_half0, (h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K,
                      tiles_n, NUM_PROGRAMS, BLOCK_N, BLOCK_K, STAGES, GROUP_SIZE_M, EPI_BLOCKED, PREFETCH)),
        (_mma_half1, (h_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, stride_hm, I, K,
                      tiles_n, NUM_PROGRAMS, BLOCK_N, BLOCK_K, STAGES, GROUP_SIZE_M, EPI_BLOCKED, PREFETCH)),
        (_loader, (x_ptr, w_desc, sorted_ptr, table_ptr, num_tiles_ptr, a_bufs, b_bufs, a_ready, b_ready, empty,
                   stride_xt, I, K, PAIRS, tiles_n, NUM_PROGRAMS, BLOCK_N, BLOCK_K, STAGES, GROUP_SIZE_M)),
    ], [4, 4], [MMA_REGS, LOADER_REGS])
