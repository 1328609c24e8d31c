"""The routed experts on a CPU as grouped products: ``reference.experts`` with one ``torch._grouped_mm`` call per
product and neuron group instead of a Python loop over sub-experts.

The reference loop costs about a dozen small torch calls per sub-expert that has pairs. With many small experts and
few tokens (OLMoE's 64 experts at a few rows each) that overhead is a good part of a CPU call. Here the kept pairs are
sorted once by (neuron group p, expert e), and each of the P neuron groups runs its gate, up and down products as one
grouped call each, on 3-D views of the weights (no copies). Every group's product is the same matrix product as the
loop's, so the answer is the reference's up to rounding (``tests/test_cpu_grouped.py``).

Used by ``kernels="auto"`` on CPU tensors where ``covers`` holds; ``kernels="reference"`` keeps the loop.
"""

from __future__ import annotations

import functools

import torch

from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import MoESpec

MAX_ROWS_PER_EXPERT = 32
"""Above this many kept pairs per sub-expert (on average) the loop's products dominate its overhead, and on the 2-core
machine the grouped calls were no faster (``benchmarks/cpu_layer.py``): the loop runs."""
MIN_SUB_EXPERTS = 16
"""With fewer sub-experts the loop's overhead is small beside its products; at Mixtral's 8 experts the grouped calls
were no faster on the 2-core machine (``benchmarks/cpu_layer.py``): the loop runs."""


@functools.cache
def grouped_mm_on_cpu() -> bool:
    """Whether this torch has a CPU ``_grouped_mm`` (2.13 does; older ones may not)."""
    try:
        torch._grouped_mm(torch.ones(2, 4), torch.ones(2, 4, 4), offs=torch.tensor([1, 2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the CPU ``_grouped_mm`` takes (not fp64)."""


def fits(t: torch.Tensor | None) -> bool:
    """An operand ``_grouped_mm`` takes: unit stride in one of its last two dims, every other stride a multiple of 16
    bytes."""
    if t is None:
        return True
    strides = [s for s, n in zip(t.stride(), t.shape) if n > 1]
    return 1 in t.stride()[-2:] and all(s == 1 or s * t.element_size() % 16 == 0 for s in strides)


def covers(x: torch.Tensor, params, spec: MoESpec, pairs: int) -> bool:
    """3-D expert weights (fused or separate) in the activations' dtype, all experts held, sizes and strides the
    grouped products take, many sub-experts and few rows per sub-expert on average."""
    ex = spec.experts
    if (x.is_cuda or ex.layout not in ("fused", "separate") or ex.local_experts or x.dtype not in GROUPED_DTYPES
            or spec.num_experts * spec.partition < MIN_SUB_EXPERTS
            or pairs > MAX_ROWS_PER_EXPERT * spec.num_experts * spec.partition or not grouped_mm_on_cpu()):
        return False
    if not rows_fit(spec, x):
        return False
    weights = reference.neuron_group_weights(params, spec, 0)[:3]
    return all(w is None or (w.dtype == x.dtype and fits(w)) for w in weights)


def rows_fit(spec: MoESpec, x: torch.Tensor) -> bool:
    """Rows of the hidden size and of a neuron group's width, in x's dtype, are 16-byte multiples, as
    ``_grouped_mm`` takes them."""
    widths = (spec.hidden, spec.intermediate // spec.partition)
    return all(width * x.element_size() % 16 == 0 for width in widths)


def _stacked_gate_up(params, spec: MoESpec, p: int):
    """Where neuron group p's gate and up rows of a fused weight form one block (P = 1, or interleaved rows), that
    block as one [E, 2c, H] view and its bias, so that one product serves both; else None."""
    ex, P, c = spec.experts, spec.partition, spec.intermediate // spec.partition
    if ex.layout != "fused" or not ex.gated or not (P == 1 or ex.interleaved):
        return None
    rows = slice(2 * p * c, 2 * (p + 1) * c)  # P = 1: all 2I rows; interleaved: g, u, g, u, ... of group p
    bias = reference.expert_tensor(params, spec, "gate_up_bias")
    return reference.expert_tensor(params, spec, "gate_up")[:, rows], None if bias is None else bias[:, rows]


def _gate_and_up(rows, group, params, spec: MoESpec, p: int, offs, expert):
    """The gate and up products of neuron group p (its ``reference.neuron_group_weights`` views; gate None without
    a gate): one grouped product where the two weights form one block (then split as they are laid out), else one
    each."""
    stacked = _stacked_gate_up(params, spec, p)
    if stacked is None or not fits(stacked[0]):
        gate, up, _, gb, ub, _ = group
        return _product(rows, gate, gb, offs, expert), _product(rows, up, ub, offs, expert)
    both = _product(rows, *stacked, offs, expert)
    if spec.experts.interleaved:
        return both[:, 0::2], both[:, 1::2]
    return both.chunk(2, dim=1)


def _product(rows: torch.Tensor, weight, bias, offs: torch.Tensor, expert: torch.Tensor):
    """rows [n, in] times each row's expert's weight [E, out, in]^T (+ its bias), the rows grouped by expert."""
    if weight is None:
        return None
    y = torch._grouped_mm(rows, weight.transpose(1, 2), offs=offs)
    return y if bias is None else y + bias[expert]


def experts(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, params, spec: MoESpec,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """``reference.experts``, grouped where ``covers`` holds (else the loop itself)."""
    kept = index.numel() if keep is None else int(keep.sum())
    if not covers(x, params, spec, kept):
        return reference.experts(x, index, weights, params, spec, keep)
    ex, P, E, width = spec.experts, spec.partition, spec.num_experts, index.shape[1]
    sub = index.flatten().long()
    group_key = (sub % P) * E + sub // P  # neuron group first, then expert
    order, counts = reference.sorted_pairs(group_key.view_as(index), keep, P * E)
    counts = counts.view(P, E)
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    start = 0
    for p, size in enumerate(counts.sum(dim=1).tolist()):
        if size == 0:
            continue
        chosen = order[start:start + size]
        start += size
        token, slot = chosen // width, chosen % width
        offs = counts[p].cumsum(0).to(torch.int32)
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts[p])
        rows, w = x[token], weights[token, slot, None]
        if ex.weight_on_input:
            rows = (rows * w).to(rows.dtype)
        group = reference.neuron_group_weights(params, spec, p)
        h = reference.expert_glu(*_gate_and_up(rows, group, params, spec, p, offs, expert), ex)
        _, _, down, _, _, db = group
        y = _product(h, down, db, offs, expert)
        out.index_add_(0, token, (y if ex.weight_on_input else y * w).to(out.dtype))
    return out.to(x.dtype)
