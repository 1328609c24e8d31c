"""The MoE operator as Triton kernels: route → group pairs → gate/up+GLU → down×weight → combine.

``moe_triton(x, params, spec)`` returns what ``reference.moe(x, params, spec)`` returns (within
floating-point tolerance). Every buffer is sized for the worst case (all T * K * P pairs kept, one
partial tile per sub-expert), so nothing reads a count back to the host: one forward is a fixed
sequence of launches that a CUDA graph can capture. A partial transformation with P = 2 is grouped
per expert with nested halves (``align.py``), so its GEMMs see E groups of full width I.

Launches: router GEMM (cuBLAS) → ``topk_route`` (also zeroes the counts and, with dropping on, writes
the keep mask and the drop statistics) → ``align.count`` → ``align.scatter`` → ``gate_up_glu`` →
``down_weighted`` → ``combine`` (+ shared experts in torch).

Host time. Decode steps run this once per layer for a handful of tokens, so the host side matters
as much as the kernels. Everything that depends only on (spec, tokens, dtypes) lives in a ``_Plan``
built once: sizes, one workspace layout for all scratch buffers (one allocation per call), each
kernel's scalar arguments and grid. The first call of a plan launches through Triton as usual
(specialisation, autotuning, compilation) and records each compiled kernel with its chosen config;
later calls replay the compiled binaries directly with raw pointers (``_Kernel.replay``), skipping
Triton's argument binding, autotuner lookup and grid lambdas. A replay is only taken when every
input tensor has the dtype, strides and 16-byte alignment the recorded specialisation assumed.
Small calls (decode) go one step further: from a plan's second call they replay all of it, router
GEMM included, as one CUDA graph of its own (``_graphed``; ``GRAPH_MAX_PAIRS``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from dsmoe_compiler.codegen import reference
from dsmoe_compiler.codegen.align import (count_groups_kernel, count_kernel, count_nested_kernel, nested_units_kernel,
                                          place_groups_kernel, scatter_kernel, scatter_nested_kernel)
from dsmoe_compiler.codegen.combine import combine_kernel
from dsmoe_compiler.codegen.down_weighted import down_weighted_kernel
from dsmoe_compiler.codegen.gate_up_glu import gate_up_glu_kernel
from dsmoe_compiler.codegen.launch import INTERPRETED, KERNEL_DTYPES
from dsmoe_compiler.codegen.launch import Kernel as _Kernel
from dsmoe_compiler.codegen.launch import hooks_on as _hooks_on
from dsmoe_compiler.codegen.launch import launch
from dsmoe_compiler.codegen.launch import signature as _signature
from dsmoe_compiler.codegen.received_rows import MAX_SEGMENTS, received_rows_kernel, received_rows_reference
from dsmoe_compiler.codegen.schedule import launch_grid, rows_bucket
from dsmoe_compiler.codegen.topk_route import keep_per_destination_kernel, topk_route_kernel
from dsmoe_compiler.ir import ACTIVATION_SLOTS, MoESpec

BLOCK_PAIRS = 256  # pairs per program of the alignment kernels (1024 left 32 programs for 4096 tokens x 8)
FAST_LAUNCH = not INTERPRETED
"""Replay recorded kernels with raw pointers; off under the interpreter (benchmarks turn it off to compare)."""
DROP_CODES = {"none": 0, "1t": 1, "2t": 2, "skip": 3, "topk": 4}
_MAX_PLANS = 1024


def _empty(shape, dtype, device):
    """Every scratch and output buffer comes from here, so tests can poison them (NaN / -1) instead."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fused_routing_ok(spec: MoESpec, dtype: torch.dtype) -> bool:
    """The route kernel covers spec's routing of inputs of ``dtype``."""
    r = spec.routing
    complete = spec.transform == "complete" and spec.partition > 1
    # GPT-OSS takes top-k of raw (bf16) logits, where exact ties are common: torch.topk breaks them the
    # way the model does (measured: 2.3 % logits error on a tiny bf16 GPT-OSS with our kernel's order). The same
    # holds for a softmax rounded to bf16 or fp16 (DBRX, Mistral-4); in fp32 that softmax is the kernel's own.
    rounded_softmax = r.softmax_in_logits_dtype and _logits_dtype(spec, dtype) != torch.float32
    return (r.score_func in ("softmax", "sigmoid") and r.num_groups == 1 and not complete and not r.score_after_topk
            and not rounded_softmax and spec.num_experts <= 1024)


def _logits_dtype(spec: MoESpec, dtype: torch.dtype) -> torch.dtype:
    """The router logits' dtype for inputs of ``dtype`` (``reference.router_logits``)."""
    return torch.float32 if spec.routing.logits_fp32 else dtype


def _route_constexprs(spec: MoESpec, logits_dtype) -> dict:
    r, E = spec.routing, spec.num_experts
    block_e = triton.next_power_of_2(E)
    # 16 tokens per program: 256 programs at 4096 tokens (64 gave 0.009 ms against 0.004 ms for OLMoE 4096 and
    # 0.015 against 0.006 ms for Qwen3-30B-A3B on the H200, results/h200/layer_ab_split_atomic.*, variant rt16)
    return dict(TOPK=spec.top_k, SIGMOID=r.score_func == "sigmoid", AFTER_TOPK=r.score_after_topk,
                RENORM=r.renormalize, HAS_SCORE_BIAS=r.score_bias, HAS_EXPERT_SCALE=r.expert_scale,
                ROUND_SCORES=logits_dtype != torch.float32 and not r.scores_fp32,
                BLOCK_T=max(1, min(16, 4096 // block_e)), BLOCK_E=block_e,
                BLOCK_K=triton.next_power_of_2(spec.top_k))


def route(x: torch.Tensor, params, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K'], routed index [T, K'] int32) with K' = top_k (or top_k * P, complete transform)."""
    if not _fused_routing_ok(spec, x.dtype):
        _, weights, index = reference.route(x, params, spec)
        return weights, index.to(torch.int32)
    weights, index, _ = _route_kernel(x, params, spec)
    return weights, index


def _copies(spec: MoESpec) -> int:
    """Column blocks of the keep mask: P under a partial transformation (2t: Major, Minor), else 1."""
    return spec.partition if spec.transform == "partial" else 1


def _drop_units(spec: MoESpec) -> tuple[float, int]:
    """``reference.record_drops``' units: (neurons of one (token, column) slot, routed + shared neurons a token)."""
    return spec.intermediate / _copies(spec), reference.routed_units(spec) + reference.shared_units(spec)


def drop_in_route_ok(spec: MoESpec, dtype: torch.dtype) -> bool:
    """The route kernel writes the keep mask of spec.drop (inputs of ``dtype``)."""
    return _fused_routing_ok(spec, dtype) and drop_rules_ok(spec)


def route_and_drop(x: torch.Tensor, params, spec: MoESpec, thresholds: torch.Tensor, stats: torch.Tensor | None):
    """``route`` plus ``reference.keep_mask``'s pairs [T, K * copies] (uint8; copies = P under a partial
    transformation) from the device-side thresholds, and ``reference.record_drops`` into stats, in the same
    launch. Only where ``drop_in_route_ok(spec, x.dtype)``."""
    return _route_kernel(x, params, spec, thresholds, stats)


def drop_rules_ok(spec: MoESpec) -> bool:
    """The kernels' drop rules (``topk_route._drop_slots``) cover spec.drop: 2t needs exactly the two halves of
    P = 2 partial."""
    return spec.drop.mode != "none" and (spec.drop.mode != "2t" or _copies(spec) == 2)


def keep_per_destination(weights: torch.Tensor, index: torch.Tensor, spec: MoESpec, thresholds: torch.Tensor,
                         owner: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
    """``ep.keep_per_destination`` in one launch: keep [T, K * copies] (uint8) of the routed weights [T, K] and
    expert ids [T, K] (int32), each pair judged with thresholds[owner[its sub-expert]] ([W, 2] fp32); with
    stats, ``reference.record_drops`` too. Only where ``drop_rules_ok(spec)``."""
    T, K = weights.shape
    copies = _copies(spec)
    keep = _empty((T, K * copies), torch.uint8, weights.device)
    if T == 0:
        return keep
    block_t = 64
    thresholds = thresholds.float().contiguous()
    launch(keep_per_destination_kernel, (triton.cdiv(T, block_t),),
           (weights.contiguous(), index.contiguous(), thresholds, owner, keep, weights if stats is None else stats),
           (T, copies, thresholds.stride(0), *_drop_units(spec)),
           dict(TOPK=K, COPIES=copies, DROP=DROP_CODES[spec.drop.mode], HAS_STATS=stats is not None, BLOCK_T=block_t,
                BLOCK_K=triton.next_power_of_2(K)))
    return keep


def _route_kernel(x, params, spec: MoESpec, thresholds=None, stats=None):
    r = spec.routing
    logits = reference.router_logits(x, params, spec)
    T, E, K = x.shape[0], spec.num_experts, spec.top_k
    weights = _empty((T, K), torch.float32 if r.weights_fp32 else x.dtype, x.device)
    index = _empty((T, K), torch.int32, x.device)
    score_bias = reference._param(spec, params, "score_bias")
    expert_scale = reference._param(spec, params, "expert_scale")
    meta = _route_constexprs(spec, logits.dtype)
    meta.update(ZERO_COUNTS=False, BLOCK_SUBS=1, DROP=0, COPIES=1, HAS_STATS=False)
    keep, (per_slot, units) = None, _drop_units(spec)
    if thresholds is not None:
        keep = _empty((T, K * _copies(spec)), torch.uint8, x.device)
        meta.update(DROP=DROP_CODES[spec.drop.mode], COPIES=_copies(spec), HAS_STATS=stats is not None)
    launch(topk_route_kernel, (triton.cdiv(T, meta["BLOCK_T"]),),
           (logits, score_bias if score_bias is not None else logits,
            expert_scale if expert_scale is not None else logits, weights, index, index,
            logits if thresholds is None else thresholds, index if keep is None else keep,
            logits if stats is None else stats),
           (T, E, 0, logits.stride(0), r.renorm_eps, r.renorm_min, r.scale, per_slot, units), meta)
    return weights, index, keep


def align(index: torch.Tensor, keep: torch.Tensor | None, num_subs: int, expand: int):
    """(sorted pair ids [pairs], counts [num_subs]) for pairs = T * K' * expand; see align.py."""
    T, topk = index.shape
    pairs_per_token = topk * expand
    pairs = T * pairs_per_token
    counts = torch.zeros(num_subs, dtype=torch.int32, device=index.device)
    rank = _empty((max(pairs, 1),), torch.int32, index.device)
    sorted_ids = _empty((max(pairs, 1),), torch.int32, index.device)
    keep_arg = keep if keep is not None else index
    grid = (triton.cdiv(pairs, BLOCK_PAIRS),)
    if pairs:
        meta = dict(HAS_KEEP=keep is not None, BLOCK_PAIRS=BLOCK_PAIRS, BLOCK_SUBS=triton.next_power_of_2(num_subs))
        count_kernel[grid](index, keep_arg, counts, rank, pairs, topk, pairs_per_token, expand, num_subs, **meta)
        scatter_kernel[grid](index, keep_arg, counts, rank, sorted_ids, pairs, topk, pairs_per_token, expand,
                             num_subs, **meta)
    return sorted_ids, counts


def group_rows(group: torch.Tensor, num_groups: int):
    """Entries [T, width] that name their row group (-1: not sent) put in group order, as expert parallelism's
    send buffer holds them (``align.py``, end): (token [T * width] int32, the source token of each row in group
    order, valid for the first sum(counts) rows; counts [num_groups] int32; row [T, width] int32, each entry's
    row, -1 where not sent). Rows of one group come in no fixed order. No host synchronisation."""
    T, width = group.shape
    n = group.numel()
    flat = group.reshape(-1).to(torch.int32).contiguous()
    counts = torch.zeros(num_groups, dtype=torch.int32, device=group.device)
    rank, token, row = (_empty((max(n, 1),), torch.int32, group.device) for _ in range(3))
    if n:
        grid, meta = (triton.cdiv(n, BLOCK_PAIRS),), dict(BLOCK_PAIRS=BLOCK_PAIRS,
                                                          BLOCK_SUBS=triton.next_power_of_2(num_groups))
        launch(count_groups_kernel, grid, (flat, counts, rank), (n, num_groups), meta)
        launch(place_groups_kernel, grid, (flat, counts, rank, token, row), (n, width, num_groups), meta)
    return token, counts, row[:n].view(T, width)


def nested_units(experts: torch.Tensor, keep: torch.Tensor | None, split: torch.Tensor | None) -> torch.Tensor:
    """EP's nested units on the device (``align.nested_units_kernel``): group [T, 2 K] int32 of each (token,
    column) from the expert ids [T, K] (int32), the kept halves [T, 2 K] (None: all) and split [E] (int32, 1
    where an expert's halves sit on two ranks; None: none do)."""
    T, K = experts.shape
    group = _empty((T, 2 * K), torch.int32, experts.device)
    n = T * K
    if n:
        block = 1024
        keep_arg = experts if keep is None else keep.view(torch.uint8)
        launch(nested_units_kernel, (triton.cdiv(n, block),),
               (experts.contiguous(), keep_arg, experts if split is None else split, group), (n, K),
               dict(HAS_KEEP=keep is not None, HAS_SPLIT=split is not None, BLOCK=block))
    return group


class _Weights:
    """The expert weights as the grouped GEMMs read them, for every layout the IR has.

    w, u: gate and up operands; dn: down. Strides are (over experts, over output channels, over input
    channels) in elements. fused: w is u is gate_up, up rows UP_OFFSET after the gate rows (I, or 1 when
    interleaved); separate: w = gate, u = up (3-D); list (per-expert 2-D tensors): w, u, dn are int64
    tables of each expert's base address (``table``), all experts sharing one set of strides.
    """

    __slots__ = ("w", "u", "dn", "gu_strides", "dn_strides", "up_offset", "table", "key", "rows", "aligned",
                 "interleaved", "first")

    def __init__(self, spec: MoESpec, params, tables=None, list_key=None):
        ex, I = spec.experts, spec.intermediate
        swap = lambda t: (t.stride(0), t.stride(2), t.stride(1)) if ex.transposed else t.stride()  # noqa: E731
        self.table, self.key = ex.layout == "list", None
        if ex.layout == "fused":
            self.w = self.u = reference._param(spec, params, "gate_up")
            self.up_offset = 1 if ex.interleaved else I
        elif ex.layout == "separate":
            self.u = reference._param(spec, params, "up")
            self.w = reference._param(spec, params, "gate") if ex.gated else self.u  # no gate: up is the one operand
            self.up_offset = 0
        if not self.table:
            self.dn = reference._param(spec, params, "down")
            self.gu_strides, self.dn_strides = swap(self.w), swap(self.dn)
            self.rows = self.gu_strides[0] // max(1, self.gu_strides[1])  # gate (+ up) rows of one expert
            self.first, self.aligned, self.interleaved = (self.w, self.u, self.dn), True, ex.interleaved
            return
        gate0, up0, down0 = (reference._param(spec, params, f"{role}.0") for role in ("gate", "up", "down"))
        self.gu_strides, self.dn_strides, self.up_offset = (0, *gate0.stride()), (0, *down0.stride()), 0
        self.rows, self.first, self.interleaved = gate0.shape[0], (gate0, up0, down0), False
        ptrs, _, self.aligned = list_key or _list_key(spec, params)
        if tables is None or tables[0] != ptrs:  # built once per set of addresses, kept by the plan
            E = spec.num_experts
            table = torch.zeros(3, E + E % 2, dtype=torch.int64)  # each row starts 16-byte aligned
            table[:, :E] = torch.tensor(ptrs, dtype=torch.int64).view(E, 3).t()
            tables = (ptrs, table.to(gate0.device))
        self.key = tables
        self.w, self.u, self.dn = tables[1][0], tables[1][1], tables[1][2]

    def descriptors_fit(self) -> tuple[bool, bool]:
        """(gate/up, down): each expert's matrix can be read through a tensor descriptor."""
        gate, up, down = self.first
        gu = self.aligned and not self.interleaved and all(_k_contiguous(t, self.gu_strides) for t in (gate, up))
        return gu, self.aligned and _k_contiguous(down, self.dn_strides)

    def n_major_fit(self) -> tuple[bool, bool]:
        """(gate/up, down): stored output channel innermost (transposed, as GPT-OSS), all experts one contiguous
        tensor, so one descriptor over [E x K, N] reads them; gate/up only interleaved (read as paired columns)."""
        gate, _, down = self.first
        fused = not self.table
        return (fused and self.interleaved and _n_contiguous(gate, self.gu_strides),
                fused and _n_contiguous(down, self.dn_strides))


def _list_key(spec: MoESpec, params):
    """Per-expert (gate, up, down) addresses; whether every expert shares dtype, shape and strides; whether
    every address is 16-byte aligned (tensor descriptors need it). One pass over the slots: this runs per call."""
    slot = {name: i for i, name in enumerate(spec.slots)}
    ptrs, shapes = [], set()
    for e in range(spec.num_experts):
        for role in ("gate", "up", "down"):
            t = params[slot[f"{role}.{e}"]]
            ptrs.append(t.data_ptr())
            shapes.add((role, t.dtype, t.shape, t.stride()))
    return tuple(ptrs), len(shapes) == 3, all(p % 16 == 0 for p in ptrs)


def kernels_cover(spec: MoESpec, params) -> bool:
    """The grouped GEMMs read these weights (list layout: every expert alike in dtype, shape and strides)."""
    return spec.experts.layout != "list" or _list_key(spec, params)[1]


TMA = os.environ.get("DSMOE_TMA", "auto")
"""Weight tiles through tensor descriptors (TMA): "auto" (on Hopper and newer, and in the interpreter), "on", "off"."""


NESTED_HALVES = os.environ.get("DSMOE_NESTED", "on") == "on"
"""P = 2 partial transformations run as one group per expert with nested halves (align.py); "off": 2 groups."""
STACK_GATE_UP = os.environ.get("DSMOE_STACK", "on") == "on"
"""A fused [gate; up] read as one [2 x BLOCK_SIZE_N] operand per K step (gate_up_glu._stacked); "off": two."""
PAIR_INTERLEAVED = os.environ.get("DSMOE_PAIR", "on") == "on"
"""An interleaved fused gate/up (GPT-OSS) read as one [2 x BLOCK_SIZE_N] operand per K step (gate_up_glu._paired);
"off": gate and up apart, each load striding by 2."""


FAST_SIGMOID = os.environ.get("DSMOE_FAST_SIGMOID", "on") == "on"
"""The GLU's sigmoid by the one-instruction tanh (``gate_up_glu._fast_sigmoid``) for 16-bit outputs on NVIDIA GPUs:
one special-function operation per element instead of two. H200, bf16 (``benchmarks/layer_ab.py --variants
base:FAST_SIGMOID=off,fast:FAST_SIGMOID=on``, results/h200/layer_ab_fast_sigmoid.json): the gate/up kernel 1-14 %
faster, the layer -0.5 to +5 %, its error against fp64 unchanged to three digits. "off": ``tl.sigmoid``."""


def fast_sigmoid(x: torch.Tensor) -> bool:
    """``FAST_SIGMOID`` where it applies: 16-bit activations on an NVIDIA GPU that has ``tanh.approx`` (sm_75 and
    newer; inline PTX, so not the interpreter)."""
    return (FAST_SIGMOID and x.is_cuda and torch.version.hip is None and not INTERPRETED
            and x.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(x.device) >= (7, 5))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``, by the rule of inductor's own Triton products: TF32 where
    torch allows it for fp32 matmuls (``torch.backends.cuda.matmul.fp32_precision`` "tf32", e.g. after
    ``torch.set_float32_matmul_precision("high")``), else three TF32 products a step ("tf32x3"), which keeps an fp32
    product's error. Measured on the H200 (benchmarks/fp32_layer.py, results/h200/fp32_layer.json), OLMoE's layer at
    4096 tokens: 6.55 ms and 4.1e-7 from fp64 experts by default, against transformers' fp32 grouped_mm's 13.71 ms and
    8.0e-7; with TF32 1.78 ms and 2.3e-3 (transformers 7.93 ms, 5.1e-4; README, "fp32 models on a GPU").
    Products without tensor cores ("ieee") took 608 ms at Qwen3-30B-A3B's 4096 tokens and their decode tiles did
    not fit the shared memory, so they are not offered. 16-bit inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"  # unused: tl.dot multiplies 16-bit inputs exactly
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)  # one read: each is a call into torch (~2 us), once per call
    allowed = setting == "tf32" if setting is not None else matmul.allow_tf32
    return "tf32" if allowed else "tf32x3"


def _use_desc(x: torch.Tensor) -> bool:
    if TMA == "off" or not hasattr(triton.language, "make_tensor_descriptor"):
        return False
    if TMA == "on" or INTERPRETED:
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def _experts_dense(w: torch.Tensor) -> bool:
    """Experts back to back, each one's matrix dense in one orientation or the other: contiguous, or a transposed view
    of a contiguous tensor (DBRX's down weights, ``transformers_hf.dbrx_moe_forward``), which is contiguous once its
    last two dimensions are swapped back."""
    return w.is_contiguous() or (w.dim() == 3 and w.transpose(1, 2).is_contiguous())


def _n_contiguous(w: torch.Tensor, strides) -> bool:  # strides: (expert, output channel, input channel)
    """A descriptor over all experts' [K, N] matrices fits: contiguous, N innermost, 16-byte rows and base."""
    return (strides[1] == 1 and _experts_dense(w) and strides[2] * w.element_size() % 16 == 0
            and w.data_ptr() % 16 == 0)


def _k_contiguous(w: torch.Tensor, strides) -> bool:  # strides: (expert, output channel, input channel)
    """A descriptor over each expert's [rows, K] matrix fits: contiguous, K innermost, 16-byte rows and experts."""
    return (strides[2] == 1 and _experts_dense(w) and w.shape[-1] * w.element_size() % 16 == 0
            and strides[0] * w.element_size() % 16 == 0 and w.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def _programs(device) -> int:
    """Programs of a persistent grouped GEMM: one per SM (a few under the interpreter, so each walks tiles)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _ensure_allocator():
    """Device-side tensor descriptors need scratch memory; keep an allocator the user set, else use torch's."""
    from triton.runtime import _allocation
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


class _Plan:
    """Everything about one MoE call that depends only on (spec, tokens, dtype, which inputs are given)."""

    def __init__(self, spec: MoESpec, T: int, dtype, device, topk: int, *, fused_route: bool, keep_given: bool,
                 drop_on: bool, stats_on: bool, weights_dtype=None):
        self.spec, self.device = spec, device
        P, r = spec.partition, spec.routing
        H, E = spec.hidden, spec.num_experts
        expand = _copies(spec)  # columns per routed slot: P under a partial transformation
        self.T, self.H, self.dtype = T, H, dtype
        self.dot_precision = dot_precision(dtype)  # part of the plan's key: a changed torch setting builds a new plan
        self.num_subs, c = E * P, spec.intermediate // P
        self.pairs_per_token = topk * expand
        self.pairs = pairs = T * self.pairs_per_token
        # P = 2 partial: one group of rows per expert with nested neuron halves (align.py), not two groups
        self.nested = NESTED_HALVES and P == 2 and spec.transform == "partial"
        self.groups = E if self.nested else self.num_subs  # groups of rows the grouped GEMMs see
        self.rows = T * topk if self.nested else pairs  # rows they may see (all kept)
        self.rows_per_token = topk if self.nested else self.pairs_per_token
        counts_len = 3 * E if self.nested else self.num_subs
        self.fused_route = fused_route
        # keep mask written by the route kernel (2t needs exactly the Major and Minor column blocks)
        self.fused_drop = fused_route and drop_on and not keep_given and drop_rules_ok(spec)
        self.torch_drop = drop_on and not keep_given and not self.fused_drop
        self.has_keep = keep_given or drop_on or r.absent_ids  # a given routing's absent pairs
        self.stats_on = stats_on
        self.weights_dtype = weights_dtype or (torch.float32 if r.weights_fp32 else dtype)
        self.stream_index = device.index if device.index is not None else 0
        self.stream_index = self.stream_index if device.type == "cuda" else None

        # one workspace: (name, dtype, shape); fused routing owns weights/index/keep there
        regions = []
        if fused_route:
            regions += [("weights", self.weights_dtype, (T, topk)), ("index", torch.int32, (T, topk))]
            if self.fused_drop:
                regions.append(("keep", torch.uint8, (T, self.pairs_per_token)))
            regions.append(("counts", torch.int32, (counts_len,)))
        rows, width = self.rows, spec.intermediate if self.nested else c
        regions += [("rank", torch.int32, (max(rows, 1),)), ("sorted", torch.int32, (max(rows, 1),)),
                    ("h", dtype, (rows, width)), ("y", dtype, (rows, H))]
        self.layout, offset = {}, 0
        for name, dt, shape in regions:
            nbytes = dt.itemsize * max(1, _numel(shape))
            self.layout[name] = (offset, nbytes, dt, shape)
            offset += (nbytes + 255) // 256 * 256
        self.ws_bytes = offset

        self.route = None
        if fused_route:
            meta = _route_constexprs(spec, _logits_dtype(spec, dtype))
            meta.update(ZERO_COUNTS=True, BLOCK_SUBS=triton.next_power_of_2(counts_len),
                        DROP=DROP_CODES[spec.drop.mode] if self.fused_drop else 0, COPIES=expand,
                        HAS_STATS=self.fused_drop and stats_on)
            self.route = _Kernel(topk_route_kernel, (triton.cdiv(T, meta["BLOCK_T"]),),
                                 (T, E, counts_len, E, r.renorm_eps, r.renorm_min, r.scale, *_drop_units(spec)), meta)
        align_grid = (triton.cdiv(rows, BLOCK_PAIRS),)
        has_keep = self.has_keep
        block_subs = triton.next_power_of_2(self.groups)
        if self.nested:
            self.count = _Kernel(count_nested_kernel, align_grid, (rows, E, topk, counts_len),
                                 dict(HAS_KEEP=has_keep, BLOCK_PAIRS=BLOCK_PAIRS,
                                      BLOCK_SUBS=triton.next_power_of_2(counts_len)))
            self.scatter = _Kernel(scatter_nested_kernel, align_grid, (rows, E, topk),
                                   dict(HAS_KEEP=has_keep, BLOCK_PAIRS=BLOCK_PAIRS, BLOCK_SUBS=block_subs))
        else:
            self.count = _Kernel(count_kernel, align_grid, (pairs, topk, self.pairs_per_token, expand, self.num_subs),
                                 dict(HAS_KEEP=has_keep, BLOCK_PAIRS=BLOCK_PAIRS, BLOCK_SUBS=block_subs))
            self.scatter = _Kernel(scatter_kernel, align_grid,
                                   (pairs, topk, self.pairs_per_token, expand, self.num_subs),
                                   dict(HAS_KEEP=has_keep, BLOCK_PAIRS=BLOCK_PAIRS, BLOCK_SUBS=block_subs))
        self.counts_len = counts_len
        self.topk, self.expand, self.c, self.block_subs = topk, expand, c, block_subs
        self.gate_up = self.down = None  # need the weights' strides: built at the first call
        self.tables = None  # list layout: (expert addresses, device tables of them)
        block_h = min(1024, triton.next_power_of_2(H))
        self.combine = _Kernel(combine_kernel, (T, triton.cdiv(H, block_h)), (H, self.rows_per_token, H, H),
                               dict(HAS_KEEP=has_keep, BLOCK_SIZE_H=block_h, NESTED=self.nested))
        self.signature = None  # of the inputs at the recorded launch; None: nothing recorded yet
        self.graph = None  # (graph, its x, its output, the addresses it reads): see _graphed
        self.graphable = FAST_LAUNCH and device.type == "cuda" and 0 < T * topk <= GRAPH_MAX_PAIRS and not keep_given
        self.rows_only, self.ones = False, None  # labelled_rows: return y (a row per pair), no combine; unit weights
        # what a captured graph of this plan keeps: its workspace, the activations copied in, the output
        self.graph_bytes = self.ws_bytes + 2 * T * H * dtype.itemsize

    def _gemms(self, x, params, wts: _Weights):
        spec, ex = self.spec, self.spec.experts
        gub, db = reference._param(spec, params, "gate_up_bias"), reference._param(spec, params, "down_bias")
        # nested halves (align.py): gate/up sees 2 E groups of width c (each half of each expert, rows
        # overlapping by the rows that kept both), writing full-width h rows; down sees E groups of width I
        rows, groups, H, c, P, I = self.rows, self.groups, self.H, self.c, spec.partition, spec.intermediate
        gu_rows, gu_groups = (2 * rows, 2 * groups) if self.nested else (rows, groups)
        dn_k, dn_p = (I, 1) if self.nested else (c, P)
        bucket = rows_bucket(rows, groups)
        w_desc, dn_desc = (_use_desc(x) and ok for ok in wts.descriptors_fit())
        gu_nmajor, dn_nmajor = (_use_desc(x) and ok for ok in wts.n_major_fit())
        programs = _programs(x.device)
        self.gate_up = _Kernel(
            gate_up_glu_kernel, lambda meta: launch_grid(meta, gu_rows, gu_groups, c, programs),
            (c, H, gu_groups, gu_rows, self.rows_per_token, P, wts.up_offset, self.topk,
             x.stride(0), *wts.gu_strides, gub.stride(0) if gub is not None else 0, I if self.nested else c,
             ex.gate_limit if ex.clamp == "softcap" else ex.alpha, ex.limit, bucket, wts.rows, programs),
            dict(GATE_STEP=2 if ex.interleaved else 1, HAS_BIAS=gub is not None, ACTIVATION=ex.activation,
                 BLOCK_SUBS=triton.next_power_of_2(gu_groups), W_DESC=w_desc, W_TABLE=wts.table,
                 STACKED=w_desc and ex.layout == "fused" and not ex.interleaved and STACK_GATE_UP,
                 PAIRED=ex.layout == "fused" and ex.interleaved and PAIR_INTERLEAVED,
                 W_NMAJOR=gu_nmajor and PAIR_INTERLEAVED,
                 GROUPS="halves" if self.nested else "plain", INPUT_WEIGHT=ex.weight_on_input, CLAMP=ex.clamp,
                 GATED=ex.gated, DOT_PRECISION=self.dot_precision, FAST_SIGMOID=fast_sigmoid(x)))
        self.down = _Kernel(
            down_weighted_kernel, lambda meta: launch_grid(meta, rows, groups, H, programs),
            (H, dn_k, groups, rows, self.rows_per_token, self.topk, dn_p,
             dn_k, *wts.dn_strides, db.stride(0) if db is not None else 0, H, bucket,
             H, I, programs, c),
            dict(HAS_BIAS=db is not None, BLOCK_SUBS=self.block_subs, W_DESC=dn_desc, W_NMAJOR=dn_nmajor,
                 W_TABLE=wts.table,
                 GROUPS="nested" if self.nested else "plain", OUTPUT_WEIGHT=not ex.weight_on_input,
                 DOT_PRECISION=self.dot_precision))

    def __call__(self, x, params, logits=None, weights=None, index=None, keep=None, thresholds=None, stats=None,
                 list_key=None, present=None):
        spec = self.spec
        if index is not None and index.dtype != torch.int32:  # int64 ids broke the count kernel's compile on
            raise TypeError(f"dualsparse: expert ids must be int32, got {index.dtype}")  # Triton 3.6 (README, EP)
        wts = _Weights(spec, params, self.tables, list_key)
        self.tables = wts.key
        w, u, dn = wts.w, wts.u, wts.dn
        gub, db = reference._param(spec, params, "gate_up_bias"), reference._param(spec, params, "down_bias")
        score_bias = reference._param(spec, params, "score_bias") if self.fused_route else None
        expert_scale = reference._param(spec, params, "expert_scale") if self.fused_route else None
        if self.torch_drop:  # routing or layout the route kernel does not cover: keep mask in torch
            keep = reference.keep_mask(weights, spec, thresholds)
        keep = reference.with_present(keep, present)  # a given routing's absent pairs: grouped by no kernel
        if self.torch_drop and stats is not None:
            reference.record_drops(stats, keep, spec, present)
        if keep is not None:  # bytes, not torch.bool: the interpreter rejects masks built from loaded bools
            keep = keep.contiguous().view(torch.uint8)
        inputs = (x, w, u, dn, gub, db, score_bias, expert_scale, logits, weights, index, keep, thresholds, stats)
        signature = _signature(inputs)
        fast = FAST_LAUNCH and self.signature is not None and signature == self.signature and not _hooks_on()
        _ensure_allocator()
        ws = _empty((self.ws_bytes,), torch.uint8, x.device)
        out = None if self.rows_only else _empty((self.T, self.H), x.dtype, x.device)
        if fast:
            base = ws.data_ptr()
            buf = {name: base + o for name, (o, _, _, _) in self.layout.items()}
            ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
            x, w, u, dn, gub, db, score_bias, expert_scale, logits, weights, index, keep, thresholds, stats, out_ptr = (
                ptr(t) for t in inputs + (out,))
        else:
            buf = {name: ws[o:o + n].view(dt).view(shape) for name, (o, n, dt, shape) in self.layout.items()}
            self._gemms(x, params, wts)  # the weights' strides are scalar arguments
            out_ptr = out
        if self.fused_route:
            weights, index, counts = buf["weights"], buf["index"], buf["counts"]
            if self.fused_drop:
                keep = buf["keep"]
        else:  # counts zeroed by a memset instead of the route kernel
            counts_t = torch.zeros(self.counts_len, dtype=torch.int32, device=ws.device)
            counts = counts_t.data_ptr() if fast else counts_t
        rank, sorted_ids, h, y = buf["rank"], buf["sorted"], buf["h"], buf["y"]
        any_ = logits if self.fused_route else index
        launches = []
        if self.fused_route:
            launches.append((self.route, (logits, score_bias if score_bias is not None else logits,
                                          expert_scale if expert_scale is not None else logits, weights, index,
                                          counts, thresholds if thresholds is not None else logits,
                                          keep if self.fused_drop else index, stats if stats is not None else any_)))
        keep_arg = keep if keep is not None else index
        launches += [
            (self.count, (index, keep_arg, counts, rank)),
            (self.scatter, (index, keep_arg, counts, rank, sorted_ids)),
            (self.gate_up, (x, w, u, gub if gub is not None else w, h, sorted_ids, counts, weights)),
            (self.down, (h, dn, db if db is not None else dn, weights, y, sorted_ids, counts)),
            (self.combine, (y, keep if keep is not None else counts, out_ptr)),
        ]
        if self.rows_only:
            launches.pop()
            o, n, dt, shape = self.layout["y"]
            out = ws[o:o + n].view(dt).view(shape)
        if fast:
            stream = torch._C._cuda_getCurrentRawStream(self.stream_index)
            for kernel, ptrs in launches:
                kernel.replay(stream, ptrs)
            return out
        record = FAST_LAUNCH and self.stream_index is not None and all(s is None or s[2] for s in signature)
        for kernel, ptrs in launches:
            kernel.launch(ptrs, record)
        recorded = record and all(kernel.run is not None for kernel, _ in launches)
        self.signature = signature if recorded else None
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_PLANS: dict = {}


def _plan(key, spec, build):
    plan = _PLANS.get(key)
    if plan is None or plan.spec is not spec:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def labelled_rows(x: torch.Tensor, label: torch.Tensor, params, spec: MoESpec, halves=None) -> torch.Tensor:
    """Unweighted outputs of rows that already name their sub-expert: y[i] = sub-expert label[i] on x[i].
    With ``halves`` [n, 2] (bool; ``spec`` a P = 2 partial transformation, top-1): label[i] is an expert and
    y[i] sums the neuron halves the row keeps (Major, Minor), through the nested-halves grouping.

    Expert parallelism's local step (``runtime/ep.py``), dropping off in ``spec``. Every EP call brings a
    different number of rows, so the plan is sized for a power-of-two capacity and reused; the rows past
    the real ones are marked dropped (no FLOPs, never read). No host synchronisation."""
    n = x.shape[0]
    if n == 0:
        return x.new_empty(0, spec.hidden)
    slots = 1 if halves is None else 2
    plan, cap = _rows_plan(spec, n, slots, x)
    index = torch.empty(cap, 1, dtype=torch.int32, device=x.device)
    index[:n, 0] = label
    keep = torch.zeros(cap, slots, dtype=torch.bool, device=x.device)
    keep[:n] = True if halves is None else halves
    return plan(x.contiguous(), params, weights=plan.ones, index=index, keep=keep)[:n]


def received_rows(x: torch.Tensor, counts: torch.Tensor, lo: int, hi: int, params, spec: MoESpec, *,
                  nested: bool, label_offset: int) -> torch.Tensor:
    """``labelled_rows`` on the rows one EP rank receives, labelled on the device from every source's rows per
    group counts[:, lo:hi] (``received_rows.py``): one launch instead of torch's expand, divisions and fills."""
    n, world = x.shape[0], counts.shape[0]
    if n == 0:
        return x.new_empty(0, spec.hidden)
    slots = 2 if nested else 1
    segments = world * (hi - lo)
    if segments > MAX_SEGMENTS:
        label, halves = received_rows_reference(counts, lo, hi, n, nested, label_offset)
        return labelled_rows(x, label, params, spec, halves if nested else None)
    plan, cap = _rows_plan(spec, n, slots, x)
    index = _empty((cap, 1), torch.int32, x.device)
    keep = _empty((cap, slots), torch.uint8, x.device)
    block_l = triton.next_power_of_2(segments)
    block_rows = max(16, min(256, 16384 // block_l))
    launch(received_rows_kernel, (triton.cdiv(cap, block_rows),), (counts, index, keep),
           (cap, counts.stride(0), lo, hi - lo, segments, label_offset),
           dict(NESTED=nested, BLOCK_ROWS=block_rows, BLOCK_L=block_l))
    return plan(x.contiguous(), params, weights=plan.ones, index=index, keep=keep)[:n]


def _rows_plan(spec: MoESpec, n: int, slots: int, x: torch.Tensor):
    """(the labelled-rows plan for n rows, its capacity): one plan per power-of-two capacity, reused."""
    cap = max(256, triton.next_power_of_2(n))
    key = ("rows", id(spec), cap, slots, x.dtype, x.device, dot_precision(x.dtype))
    return _plan(key, spec, lambda: _labelled_rows_plan(spec, cap, x.dtype, x.device)), cap


def _labelled_rows_plan(spec: MoESpec, cap: int, dtype, device) -> _Plan:
    plan = _Plan(spec, cap, dtype, device, 1, fused_route=False, keep_given=True, drop_on=False, stats_on=False,
                 weights_dtype=torch.float32)
    plan.rows_only = True
    plan.ones = torch.ones(cap, 1, dtype=torch.float32, device=device)
    return plan


def moe_triton(x: torch.Tensor, params, spec: MoESpec, keep: torch.Tensor | None = None, *,
               thresholds: torch.Tensor | None = None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """The whole MoE block on x [T, H]; keep [T, K*P] (bool) marks the pairs a drop pass kept.

    With ``spec.drop`` on, ``keep`` is computed from the routed weights and the block's device-side
    ``thresholds`` as ``reference.keep_mask`` does (inside the route kernel where it covers the routing),
    and ``stats`` are accumulated on the device: no host sync.
    """
    if x.dtype not in KERNEL_DTYPES:  # fp64 and the like: the tiles and tensor-core products are not for them
        return reference.moe(x, params, spec, thresholds, stats, keep=keep)
    list_key = _list_key(spec, params) if spec.experts.layout == "list" else None
    if list_key is not None and not list_key[1]:  # experts of a ModuleList that differ in dtype or strides
        return reference.moe(x, params, spec, thresholds, stats, keep=keep)
    x = x.contiguous()
    T = x.shape[0]
    drop_on = spec.drop.mode != "none" and thresholds is not None
    if drop_on:
        keep = None  # recomputed from the thresholds, as before
    fused = _fused_routing_ok(spec, x.dtype)
    key = (id(spec), T, x.dtype, x.device, keep is not None, drop_on, stats is not None, dot_precision(x.dtype))
    plan = _PLANS.get(key)
    if plan is None or plan.spec is not spec:
        topk = spec.top_k * (spec.partition if spec.transform == "complete" and not fused else 1)
        if T * topk == 0:
            out = _empty(x.shape, x.dtype, x.device).zero_()
            return out + reference.shared_experts(x, params, spec) if spec.shared is not None else out
        plan = _plan(key, spec, lambda: _Plan(spec, T, x.dtype, x.device, topk, fused_route=fused,
                                              keep_given=keep is not None, drop_on=drop_on,
                                              stats_on=stats is not None))
    thresholds, stats = (thresholds, stats) if drop_on else (None, None)
    # activations a graph replay copies in: x, and the router's own input (Gemma-4) or the given routing if any
    act_slots = tuple(name for name in spec.slots if name in ACTIVATION_SLOTS)
    acts = (x, *(reference._param(spec, params, name) for name in act_slots))
    forward = functools.partial(_forward, act_slots=act_slots, params=params, spec=spec, plan=plan, keep=keep,
                                thresholds=thresholds, stats=stats, list_key=list_key, fused=fused)
    if plan.graphable and not torch.cuda.is_current_stream_capturing() and not _hooks_on():  # never with keep given
        return _graphed(plan, forward, acts, (params, thresholds, stats, list_key))
    return forward(*acts)


def _forward(x, *acts, act_slots, params, spec, plan, keep, thresholds, stats, list_key, fused):
    """Routing (cuBLAS router GEMM + the route kernel, or torch), the plan's launches, shared experts. ``acts``: the
    tensors of the activation slots ``act_slots``, in place of those in ``params`` (a graph replay's own copies)."""
    if acts:
        params = list(params)
        for name, act in zip(act_slots, acts):
            params[spec.slots.index(name)] = act
    if fused:
        out = plan(x, params, logits=reference.router_logits(x, params, spec).contiguous(), keep=keep,
                   thresholds=thresholds, stats=stats, list_key=list_key)
    else:
        _, weights, index = reference.route(x, params, spec)
        out = plan(x, params, weights=weights.contiguous(), index=index.to(torch.int32), keep=keep,
                   thresholds=thresholds, stats=stats, list_key=list_key, present=reference.present_pairs(params, spec))
    if spec.shared is not None:
        out = out + reference.shared_experts(x, params, spec)
    return out


# ---- small calls as one CUDA graph ------------------------------------------------------------------
GRAPH_MAX_PAIRS = int(os.environ.get("DSMOE_GRAPH_MAX_PAIRS", "4096"))
"""Calls with at most this many (token, slot) pairs (up to 512 tokens at top-8) replay the operator's own launches as
one CUDA graph when called outside any capture; 0 turns it off. ``_graphed`` says why. Each captured graph keeps its
buffers (``_Plan.graph_bytes``; 4096 pairs: ~25 MB at OLMoE's sizes, ~150 MB at Mixtral's), at most MAX_GRAPHS of
them and GRAPH_MAX_BYTES together. (1024 until the thirteenth session: 256 tokens at top-6, NemotronH-sized, ran
host-bound above it, 0.83-0.99 ms against 0.55 ms replayed; README, "NemotronH's block".)"""
MAX_GRAPHS = 64
GRAPH_MAX_BYTES = int(float(os.environ.get("DSMOE_GRAPH_MAX_MB", "2048")) * 2**20)


def _addresses(inputs, slots) -> tuple:
    """Where every tensor the graph reads besides x lives (a graph replays fixed addresses). A ModuleList's
    experts ("gate.0", ...) are in list_key already, computed once per call anyway."""
    params, thresholds, stats, list_key = inputs
    ptrs = tuple(None if p is None else p.data_ptr() for name, p in zip(slots, params)
                 if (list_key is None or "." not in name) and name not in ACTIVATION_SLOTS)
    return ptrs + tuple(None if t is None else t.data_ptr() for t in (thresholds, stats)) + (list_key,)


def _graphed(plan, forward, acts, inputs):
    """The call as one CUDA graph replay (the activations ``acts``, x and the router's own input if any, copied
    into the graph's own inputs, the output cloned out).

    Without CUDA graphs a decode step is host-bound: each call of the operator issues the router GEMM
    and six kernel launches, ~0.1-0.2 ms of host time on the H200's host (benchmarks/moe_layer.py,
    ours_host), where one graph replay and two copies take a fraction of that. The graph is captured at
    the second call of a plan (the first compiles, autotunes and records the kernels); it reads the weights,
    thresholds and statistics at the addresses they had then, so a call where any moved runs the plain
    launches, and that plan stops using its graph (inputs that move every call would otherwise recapture
    every call). Inside a user's own capture (torch.compile's reduce-overhead) the launches are captured
    into that graph instead, as before."""
    addresses = _addresses(inputs, plan.spec.slots)
    if plan.graph is None:
        if plan.signature is None:  # first call: compile, autotune, record
            return forward(*acts)
        held = [p for p in _PLANS.values() if p.graph is not None]
        if len(held) >= MAX_GRAPHS or sum(p.graph_bytes for p in held) + plan.graph_bytes > GRAPH_MAX_BYTES:
            plan.graphable = False
            return forward(*acts)
        static_acts = tuple(a.clone() for a in acts)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls are theirs
            static_out = forward(*static_acts)
        plan.graph = (graph, static_acts, static_out, addresses)
    graph, static_acts, static_out, captured = plan.graph
    if addresses != captured or any(s.shape != a.shape for s, a in zip(static_acts, acts)):
        plan.graph, plan.graphable = None, False
        return forward(*acts)
    for static, act in zip(static_acts, acts):
        static.copy_(act)
    graph.replay()
    return static_out.clone()
