"""Expert parallelism's send buffer: rows of x in send order, the row count read on the device.

    send[r] = x[token[r]]      for r < n = sum(counts);   rows n.. of send are not written

``dispatch.group_rows`` gives every sent (token, column) its row r and token[r]. How many rows are sent depends
on the drop decisions (and on experts split across ranks), so the buffer is sized for the most rows that can
be sent and the kernel reads n from the per-group counts itself: no host synchronisation. The exchange sends
the first n rows (``runtime/ep.py``, ``sent_rows``), whose count the host learns with the split sizes anyway.
``gather_rows_reference`` is the same copy in torch (the kernel's test oracle).
"""

import torch
import triton
import triton.language as tl

from dsmoe_compiler.codegen.launch import launch

BLOCK_ROWS = 8


@triton.jit
def gather_rows_kernel(x_ptr, token_ptr, counts_ptr, send_ptr, H, num_groups, stride_x, stride_send,
                       BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    groups = tl.arange(0, BLOCK_GROUPS)
    n = tl.sum(tl.load(counts_ptr + groups, mask=groups < num_groups, other=0))  # rows sent (a few hundred counts)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < n
    token = tl.load(token_ptr + rows, mask=live, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = live[:, None] & (cols < H)[None, :]
    vals = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=mask)
    tl.store(send_ptr + rows.to(tl.int64)[:, None] * stride_send + cols[None, :], vals, mask=mask)


def gather_rows(x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor, bound: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """send [bound, H] from x [T, H], token [>= bound] (int32, the first sum(counts) valid) and counts [groups]
    (int32, on the device); one launch. ``out``: a [bound, H] buffer to write (the tests pass a poisoned one)."""
    H = x.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    send = torch.empty(bound, H, dtype=x.dtype, device=x.device) if out is None else out
    if bound == 0 or H == 0:
        return send
    block_h = min(1024, triton.next_power_of_2(H))
    launch(gather_rows_kernel, (triton.cdiv(bound, BLOCK_ROWS), triton.cdiv(H, block_h)),
           (x, token, counts, send), (H, counts.numel(), x.stride(0), send.stride(0)),
           dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_H=block_h, BLOCK_GROUPS=triton.next_power_of_2(max(counts.numel(), 1))))
    return send


def gather_rows_reference(x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The rows sent: x[token[:n]] [n, H] (n = sum(counts); reads the count on the host)."""
    return x.index_select(0, token[:int(counts.sum())].long())
