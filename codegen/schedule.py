"""Which rows a grouped-GEMM program owns: the tile schedule shared by both grouped GEMMs.

Rows are the kept pairs sorted by sub-expert (``align.py``), group s holding counts[s] rows from
start[s] = sum of the counts before it. Group s takes ceil(counts[s] / BLOCK_SIZE_M) M-tiles.
BLOCK_SIZE_M is an autotuning choice, so the schedule is recomputed from the counts inside each
program rather than stored by the alignment step. Nothing depends on the routing on the host (no
host synchronisation, CUDA-graph capturable), in either of the two launch shapes:

- one program per tile: the grid is launched for the worst case (cdiv(pairs, BLOCK_SIZE_M) + groups
  M-tiles), and a program whose tile lies past the last group returns at once;
- persistent (``PERSISTENT`` configs): one program per SM walks tiles pid, pid + programs, ... up to
  the real tile count, computed on the device. The loop over tiles is flattened with the K loop, so
  the loads of the next tile start while this tile's epilogue runs, and no program starts empty.
"""

import functools
import os

import torch
import triton
import triton.language as tl

PERSISTENT = os.environ.get("DSMOE_PERSISTENT", "auto")
"""Launch shape of the grouped GEMMs: "auto" (prefill tiles persistent, decode tiles one program per tile),
"on" (all persistent), "off" (all one program per tile)."""


def gemm_config(m, n, k, warps, stages, lo=0, hi=1 << 30, group=8, persistent=False, wide=False):
    """One autotuning config of the grouped GEMMs; (lo, hi) = the average rows per group it is tried for. ``wide``:
    a prefill tile for 4-byte inputs (fp32) only. The 16-bit prefill tiles' K steps need more shared memory than a
    GPU has when an element takes 4 bytes (H200, fp32 OLMoE at 4096 tokens: 360 KB asked for, 227 KB there;
    benchmarks/fp32_layer.py)."""
    return triton.Config({"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": group,
                          "MIN_ROWS": lo, "MAX_ROWS": hi, "PERSISTENT": persistent, "WIDE": wide},
                         num_warps=warps, num_stages=stages)


def wide_prefill(*tiles) -> list:
    """fp32's prefill tiles (``gemm_config(..., wide=True)``), each (m, n, k, warps, stages), tried from 64 rows up."""
    return [gemm_config(*tile, lo=64, wide=True) for tile in tiles]


def tile_key(config) -> tuple:
    kw = config.kwargs
    return kw["BLOCK_SIZE_M"], kw["BLOCK_SIZE_N"], kw["BLOCK_SIZE_K"], config.num_warps, config.num_stages


def launch_shapes(decode, prefill, both_for_prefill=False):
    """The autotuning list as DSMOE_PERSISTENT says. Prefill tiles run persistent by default: in
    benchmarks/gemm_sweep.py (H100, results/gemm_sweep.json) the persistent launch of the best tile beat
    the one-program-per-tile launch of every tile for both GEMMs at every prefill shape (e.g. OLMoE 16384
    tokens: down 0.975 against 1.105 ms). ``both_for_prefill``: under "auto" the prefill tiles are listed in
    both launch shapes, for a prune that picks one per call (``prune_launch_shape``)."""
    if PERSISTENT == "off":
        return decode + prefill
    if PERSISTENT == "on":
        return as_persistent(decode + prefill, True)
    return decode + as_persistent(prefill, True) + (as_persistent(prefill, False) if both_for_prefill else [])


def as_persistent(configs, persistent: bool):
    """The same tiles with the launch shape set (``gemm_sweep.py`` also turns it off for comparison)."""
    return [triton.Config({**c.kwargs, "PERSISTENT": persistent}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in configs]


def launch_grid(meta, pairs, groups, columns, programs):
    """Programs of a grouped-GEMM launch: the worst-case tile count, or at most one per SM when persistent."""
    tiles = (triton.cdiv(pairs, meta["BLOCK_SIZE_M"]) + groups) * triton.cdiv(columns, meta["BLOCK_SIZE_N"])
    return (min(tiles, programs) if meta["PERSISTENT"] else tiles,)


@triton.jit
def group_tiles(counts_ptr, num_subs, BLOCK_SIZE_M: tl.constexpr, BLOCK_SUBS: tl.constexpr, GROUPS: tl.constexpr):
    """Per group (vectors over BLOCK_SUBS): M-tiles, running end of the M-tiles, rows, first sorted row.

    GROUPS "plain": counts[g] rows per group, groups back to back. With ``align.py``'s nested halves,
    counts holds [A | B | C] (rows keeping the Major half only, both, the Minor half only, per expert;
    an expert's rows ordered A, B, C): "nested": one group per expert of A + B + C rows (num_subs =
    experts); "halves": group 2e + p is half p of expert e (num_subs = 2 x experts), the A + B rows
    that need the Major half or the B + C rows from A on that need the Minor half."""
    g = tl.arange(0, BLOCK_SUBS)
    if GROUPS == "plain":
        counts = tl.load(counts_ptr + g, mask=g < num_subs, other=0)
        starts = tl.cumsum(counts, 0) - counts
    else:
        experts = num_subs
        e = g
        if GROUPS == "halves":
            experts = num_subs // 2
            e = g // 2
        live = g < num_subs
        a = tl.load(counts_ptr + e, mask=live, other=0)
        b = tl.load(counts_ptr + experts + e, mask=live, other=0)
        c = tl.load(counts_ptr + 2 * experts + e, mask=live, other=0)
        total = a + b + c
        if GROUPS == "nested":
            counts = total
            starts = tl.cumsum(counts, 0) - counts
        else:
            major = g % 2 == 0
            expert_start = tl.cumsum(tl.where(major, total, 0), 0) - total
            counts = tl.where(major, a + b, b + c)
            starts = expert_start + tl.where(major, 0, a)
    tiles = (counts + BLOCK_SIZE_M - 1) // BLOCK_SIZE_M
    return tiles, tl.cumsum(tiles, 0), counts, starts


@triton.jit
def locate(pid_m, tiles, tiles_end, counts, starts, BLOCK_SIZE_M: tl.constexpr, BLOCK_SUBS: tl.constexpr):
    """(group, first sorted row of M-tile pid_m, rows of the group left from there); group == groups: no work."""
    group = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    mine = tl.arange(0, BLOCK_SUBS) == group
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
    start = tl.sum(tl.where(mine, starts, 0), 0)
    count = tl.sum(tl.where(mine, counts, 0), 0)
    local = (pid_m - first_tile) * BLOCK_SIZE_M
    return group, start + local, count - local


@triton.jit
def tile_of(pid_m, counts_ptr, num_subs, BLOCK_SIZE_M: tl.constexpr, BLOCK_SUBS: tl.constexpr, GROUPS: tl.constexpr):
    """``locate`` for one tile, the group table read from counts."""
    tiles, tiles_end, counts, starts = group_tiles(counts_ptr, num_subs, BLOCK_SIZE_M, BLOCK_SUBS, GROUPS)
    return locate(pid_m, tiles, tiles_end, counts, starts, BLOCK_SIZE_M, BLOCK_SUBS)


@triton.jit
def halves_of(counts_ptr, group, num_subs, rows_left, GROUPS: tl.constexpr):
    """Which rows of a tile of GROUPS "nested" need which neuron half: (rows from the tile's first that
    need the Major half, first row that needs the Minor half); without nesting every row needs both."""
    if GROUPS == "nested":
        both = tl.load(counts_ptr + num_subs + group)
        minor_only = tl.load(counts_ptr + 2 * num_subs + group)
        return rows_left - minor_only, rows_left - minor_only - both
    return rows_left, rows_left * 0


@triton.jit
def pair_weight(route_w_ptr, pair, mask, PAIRS, TOPK):
    """The routing weight (fp32) of each row's pair: column col of a token reads routed slot col % TOPK (a partial
    transformation tiles the weights P times)."""
    slot = (pair // PAIRS) * TOPK + (pair % PAIRS) % TOPK
    return tl.load(route_w_ptr + slot, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_SIZE_M: tl.constexpr):
    """Tutorial-style grouped order: GROUP_SIZE_M M-tiles (mostly one expert) sweep N together for L2 reuse."""
    width = GROUP_SIZE_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_SIZE_M
    size_m = min(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


def rows_bucket(pairs: int, groups: int) -> int:
    """Autotuning key: average rows per group, rounded to a power of two (decode ~1, prefill hundreds)."""
    return min(triton.next_power_of_2(max(1, pairs // max(1, groups))), 1024)


def is_prefill(config) -> bool:
    """A prefill tile: tried from 64 average rows per group up (decode tiles stop below)."""
    return config.kwargs.get("MIN_ROWS", 0) >= 64


def _arg(name, named_args, kwargs):
    return named_args[name] if name in named_args else kwargs[name]


def prune_by_rows(configs, named_args, **kwargs):
    """Keep the tiles whose BLOCK_SIZE_M suits the rows per group (16 for decode, up to 128 for prefill) and whose
    pipeline fits the GPU's shared memory for the input's element size (prefill: the ``wide`` tiles of ``gemm_config``
    for 4-byte inputs, the others for 16-bit ones)."""
    rows = _arg("ROWS_BUCKET", named_args, kwargs)
    fit = [c for c in configs if c.kwargs.get("MIN_ROWS", 0) <= rows <= c.kwargs.get("MAX_ROWS", 1 << 30)]
    fit = fit or configs[:1]
    gate_up = "x_ptr" in named_args
    operand = named_args.get("x_ptr" if gate_up else "h_ptr")  # absent: a policy test without tensors
    element = operand.element_size() if operand is not None else 2
    wide = element >= 4
    sized = [c for c in fit if c.kwargs.get("WIDE", False) == wide or (wide and not is_prefill(c))] or fit
    if operand is None:
        return sized
    limit = _shared_memory(operand.device)
    return [c for c in sized if _pipeline_bytes(c, element, 2 if gate_up else 1) <= limit] or sized


def _pipeline_bytes(config, element_bytes: int, weight_tiles: int) -> int:
    """A lower bound of a tile's shared memory: the buffers of its software pipeline (one fewer than its stages,
    as Triton allocates them), each an x tile and ``weight_tiles`` weight tiles (gate/up: gate and up)."""
    m, n, k, _, stages = tile_key(config)
    return (stages - 1) * (m + weight_tiles * n) * k * element_bytes


@functools.lru_cache(maxsize=None)
def _shared_memory(device) -> int:
    if device.type != "cuda":  # the interpreter: no limit
        return 1 << 62
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def prune_launch_shape(configs, named_args, **kwargs):
    """``prune_by_rows``, then, of prefill tiles listed in both launch shapes, the persistent ones when the
    gate/up operand is stacked and the one-program-per-tile ones otherwise (two operands; GPT-OSS's paired
    operand too: persistent was not faster there, README "GPT-OSS's layout"). Measured on the
    H200 (benchmarks/shared_expert.py, results/h200/shared_expert_*.json, a one-expert group in the
    "separate" layout): two-operand gate/up per tile 0.161 against 0.191 ms persistent at 4096 x 2048 x 2816,
    0.300 / 0.356 at 4096 x 2048 x 5632, 0.327 / 0.422 at 4096 x 7168 x 2048."""
    fit = prune_by_rows(configs, named_args, **kwargs)
    persistent = bool(_arg("STACKED", named_args, kwargs))
    shaped = [c for c in fit if not is_prefill(c) or c.kwargs["PERSISTENT"] == persistent]
    return shaped or fit
