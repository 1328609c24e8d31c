"""Labels of the rows expert parallelism receives: each row's local expert and the neuron halves it carries.

After the dispatch all_to_all a rank holds its rows by source rank, then by row group (``runtime/ep.py``):
source w's rows of group lo + g are the counts[w, lo + g] rows after everything before them. The local step
(``dispatch.received_rows``) needs, per row, the label its kernels group by (a local sub-expert, or under
nesting a local expert) and its keep flags ([Major, Minor] halves under nesting: group 3 e + c has the Major
half for c = 0, 1 and the Minor half for c = 1, 2). Rows n .. cap - 1 of the plan's capacity are marked
kept by nothing. n is summed from the counts in the kernel, so one recorded launch serves every call.

One program labels BLOCK_ROWS rows: the inclusive cumsum of the W * G counts (G = groups of this rank) is
computed in registers, and row i lies in the first segment whose end exceeds i, i.e. it follows as many
segments as end at or before i (empty segments end where the previous one did, so they are skipped).
``received_rows_reference`` is the same labelling in torch (repeat_interleave): the CPU path's and the
kernel test's oracle.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def received_rows_kernel(counts_ptr, index_ptr, keep_ptr, cap, stride_source, lo, G, L, label_offset,
                         NESTED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, BLOCK_L)  # (source, group) segments, source-major
    counts = tl.load(counts_ptr + (j // G) * stride_source + lo + j % G, mask=j < L, other=0).to(tl.int32)
    ends = tl.cumsum(counts, 0)
    segment = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
    group = lo + segment % G
    live = rows < tl.sum(counts, 0)  # n, the rows received (not a scalar argument: the launch replays)
    in_cap = rows < cap
    if NESTED:
        cls = group % 3
        tl.store(index_ptr + rows, tl.where(live, group // 3 - label_offset, 0), mask=in_cap)
        tl.store(keep_ptr + 2 * rows, (live & (cls != 2)).to(tl.uint8), mask=in_cap)
        tl.store(keep_ptr + 2 * rows + 1, (live & (cls != 0)).to(tl.uint8), mask=in_cap)
    else:
        tl.store(index_ptr + rows, tl.where(live, group - label_offset, 0), mask=in_cap)
        tl.store(keep_ptr + rows, live.to(tl.uint8), mask=in_cap)


MAX_SEGMENTS = 4096
"""Above this many (source, group) segments the torch labelling is used (the kernel's registers grow with them)."""


def received_rows_reference(counts: torch.Tensor, lo: int, hi: int, n: int, nested: bool, label_offset: int):
    """(label [n] long, keep [n, 2 if nested else 1] bool) of the received rows, in torch."""
    world = counts.shape[0]
    groups = torch.arange(lo, hi, device=counts.device).repeat(world)
    group = groups.repeat_interleave(counts[:, lo:hi].reshape(-1), output_size=n)  # output_size: no host read
    if not nested:
        return group - label_offset, torch.ones(n, 1, dtype=torch.bool, device=counts.device)
    return group // 3 - label_offset, halves_of_class(group % 3)


def halves_of_class(cls: torch.Tensor) -> torch.Tensor:
    """[..., 2] (Major, Minor) halves a nested unit of class cls carries: 0 Major only, 1 both, 2 Minor only."""
    return torch.stack([cls != 2, cls != 0], dim=-1)
