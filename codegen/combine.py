"""Sum each token's pair rows: out[t] = sum over kept columns j of y[row(t * PAIRS + j)], in a fixed order.

row(p) is p itself, or with HAS_POS the row the down GEMM's tile gave pair p (``down_weighted.py``, Y_SORTED).
Dropped pairs were never computed (their rows of y hold garbage, and pos too), so the keep mask is read
again here. NESTED (``align.py``'s nested halves): one row per (token, slot) that kept either neuron half.
Summed in fp32 and cast once, like the reference's fp32 index_add.
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(y_ptr, keep_ptr, out_ptr, pos_ptr, H, PAIRS, stride_yp, stride_ot,
                   HAS_KEEP: tl.constexpr, BLOCK_SIZE_H: tl.constexpr, NESTED: tl.constexpr = False,
                   HAS_POS: tl.constexpr = False, BLOCK_PAIRS: tl.constexpr = 1):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE_H + tl.arange(0, BLOCK_SIZE_H)
    mask = offs < H
    if HAS_POS:  # the token's rows, loaded at once rather than one dependent load per pair
        cols = tl.arange(0, BLOCK_PAIRS)
        rows = tl.load(pos_ptr + token * PAIRS + cols, mask=cols < PAIRS, other=0)
    acc = tl.zeros((BLOCK_SIZE_H,), dtype=tl.float32)
    for j in range(0, PAIRS):
        pair = token * PAIRS + j
        live = mask
        if HAS_KEEP and NESTED:  # one row per (token, slot): it exists when either half was kept
            halves = token * 2 * PAIRS + j + offs * 0
            live = live & ((tl.load(keep_ptr + halves) | tl.load(keep_ptr + halves + PAIRS)) != 0)
        elif HAS_KEEP:
            live = live & (tl.load(keep_ptr + pair + offs * 0) != 0)  # one flag, broadcast over the row
        row = pair
        if HAS_POS:
            row = tl.sum(tl.where(cols == j, rows, 0), 0).to(tl.int64)
        acc += tl.load(y_ptr + row * stride_yp + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
