"""Sum each token's pair rows: out[t] = sum over kept columns j of y[t * PAIRS + j], in a fixed order.

Dropped pairs were never computed (their rows of y hold garbage), so the keep mask is read again here.
NESTED (``align.py``'s nested halves): one row per (token, slot) that kept either neuron half.
Summed in fp32 and cast once, like the reference's fp32 index_add.
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(y_ptr, keep_ptr, out_ptr, H, PAIRS, stride_yp, stride_ot,
                   HAS_KEEP: tl.constexpr, BLOCK_SIZE_H: tl.constexpr, NESTED: tl.constexpr = False):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE_H + tl.arange(0, BLOCK_SIZE_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_SIZE_H,), dtype=tl.float32)
    for j in range(0, PAIRS):
        pair = token * PAIRS + j
        live = mask
        if HAS_KEEP and NESTED:  # one row per (token, slot): it exists when either half was kept
            halves = token * 2 * PAIRS + j + offs * 0
            live = live & ((tl.load(keep_ptr + halves) | tl.load(keep_ptr + halves + PAIRS)) != 0)
        elif HAS_KEEP:
            live = live & (tl.load(keep_ptr + pair + offs * 0) != 0)  # one flag, broadcast over the row
        acc += tl.load(y_ptr + pair * stride_yp + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
