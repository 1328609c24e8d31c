"""Expert parallelism's exchange sizes from every rank's rows per group, in one launch.

    send[d] = sum over groups g held by rank d of counts[rank, g]          (rows this rank sends to d)
    recv[s] = sum over groups g held by this rank of counts[s, g]           (rows this rank receives from s)

counts [W, groups] is the all-gathered rows per row group (``runtime/ep.py``); groups are held by contiguous
ranks (``rank_of`` [groups] names each group's rank). The host reads [send | recv] once per block, the one
synchronisation of the exchange (``ep.splits``). ``exchange_sizes_reference`` is the same in torch (about ten
small ops before this kernel, ~25 µs of host time each on the GPU machine's host).
"""

import torch
import triton
import triton.language as tl

from dsmoe_compiler.codegen.launch import launch

BLOCK_G = 128


@triton.jit
def exchange_sizes_kernel(counts_ptr, rank_of_ptr, out_ptr, world, groups, rank,
                          BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr):
    ranks = tl.arange(0, BLOCK_W)
    send = tl.zeros([BLOCK_W], dtype=tl.int64)
    recv = tl.zeros([BLOCK_W], dtype=tl.int64)
    for start in range(0, groups, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        live = g < groups
        owner = tl.load(rank_of_ptr + g, mask=live, other=-1)
        mine = tl.load(counts_ptr + rank * groups + g, mask=live, other=0).to(tl.int64)
        send += tl.sum(tl.where(owner[:, None] == ranks[None, :], mine[:, None], 0), axis=0)
        held = live & (owner == rank)
        rows = tl.load(counts_ptr + ranks[:, None] * groups + g[None, :], mask=(ranks < world)[:, None] & held[None, :],
                       other=0).to(tl.int64)
        recv += tl.sum(rows, axis=1)
    tl.store(out_ptr + ranks, send, mask=ranks < world)
    tl.store(out_ptr + world + ranks, recv, mask=ranks < world)


def exchange_sizes(counts: torch.Tensor, rank_of: torch.Tensor, rank: int, out: torch.Tensor | None = None):
    """[2 W] int64: [send | recv] rows of rank ``rank`` from counts [W, groups] (int64) and rank_of [groups].
    ``out``: a [2 W] buffer to write (the tests pass a poisoned one)."""
    world, groups = counts.shape
    sizes = torch.empty(2 * world, dtype=torch.int64, device=counts.device) if out is None else out
    launch(exchange_sizes_kernel, (1,), (counts.contiguous(), rank_of, sizes), (world, groups, rank),
           dict(BLOCK_W=triton.next_power_of_2(world), BLOCK_G=BLOCK_G))
    return sizes


def exchange_sizes_reference(counts: torch.Tensor, bounds: tuple[int, ...], rank: int) -> torch.Tensor:
    """The same from the groups' rank boundaries (rank r holds groups bounds[r]..bounds[r + 1])."""
    world = counts.shape[0]
    mine = counts[rank]
    send = torch.stack([mine[bounds[r]:bounds[r + 1]].sum() for r in range(world)])
    recv = counts[:, bounds[rank]:bounds[rank + 1]].sum(dim=1)
    return torch.cat([send, recv])
