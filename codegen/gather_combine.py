"""Weighted sum of each token's pair rows gathered from a buffer in another order (expert parallelism).

    out[t] = sum over j of weights[t, j] * src[rows[t, j]]      (rows[t, j] < 0: the pair was dropped)

The EP combine (``runtime/ep.py``): the expert outputs come back from the all_to_all in the order the
pairs were sent (sorted by sub-expert), unweighted; ``rows`` is that order's inverse. One read of each
kept row, the weight applied on the way, summed in fp32 in slot order and cast once, like the
single-GPU ``combine.py``. ``gather_combine_reference`` is the same sum in torch (the CPU path and the
kernel's test oracle).
"""

import torch
import triton
import triton.language as tl

from dsmoe_compiler.codegen.launch import launch


@triton.jit
def gather_combine_kernel(src_ptr, rows_ptr, weights_ptr, out_ptr, H, PAIRS, stride_src, stride_out,
                          BLOCK_SIZE_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE_H + tl.arange(0, BLOCK_SIZE_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_SIZE_H,), dtype=tl.float32)
    for j in range(0, PAIRS):
        row = tl.load(rows_ptr + token * PAIRS + j).to(tl.int64)
        weight = tl.load(weights_ptr + token * PAIRS + j).to(tl.float32)
        live = mask & (offs * 0 + row >= 0)  # the row's flag broadcast over the block (a scalar mask is rejected)
        vals = tl.load(src_ptr + row * stride_src + offs, mask=live, other=0.0)
        acc += vals.to(tl.float32) * weight
    tl.store(out_ptr + token * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_combine(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, out_dtype=None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] from src [N, H], rows [T, K] (int, -1 = dropped) and weights [T, K]; one launch, no host sync.
    ``out``: a [T, H] buffer to write (the tests pass a poisoned one)."""
    T, K = rows.shape
    H = src.shape[1]
    if out is None:
        out = torch.empty(T, H, dtype=out_dtype or src.dtype, device=src.device)
    if T == 0:
        return out
    src = src if src.shape[0] else src.new_zeros(1, H)  # every row dropped: nothing is read, any pointer does
    block_h = min(1024, triton.next_power_of_2(H))
    launch(gather_combine_kernel, (T, triton.cdiv(H, block_h)), (src, rows.contiguous(), weights.contiguous(), out),
           (H, K, src.stride(0), out.stride(0)), dict(BLOCK_SIZE_H=block_h))
    return out


def gather_combine_reference(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, out_dtype=None):
    """The same sum in torch, slot by slot (memory of one [T, H] fp32 sum, not [T, K, H])."""
    T, K = rows.shape
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])])  # row N: zeros, for the dropped pairs
    take = torch.where(rows >= 0, rows, src.shape[0]).long()
    acc = torch.zeros(T, src.shape[1], dtype=torch.float32, device=src.device)
    for j in range(K):
        acc += padded[take[:, j]].float() * weights[:, j, None].float()
    return acc.to(out_dtype or src.dtype)
