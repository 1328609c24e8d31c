"""The CPU experts as grouped products (codegen/cpu_grouped.py) against the reference loop.

Hypothesis draws whole blocks as test_partition.py does (routing, fused or separate 3-D experts in either
orientation, biases, activations, shared experts, P neuron groups under either transformation), with sizes whose
rows and weights the grouped products take, and a random set of dropped pairs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import rel_err
from test_partition import blocks, random_params, slots_of

import dsmoe_compiler
from dsmoe_compiler.codegen import cpu_grouped, reference
from dsmoe_compiler.ir import ExpertsSpec, MoESpec
from dsmoe_compiler.passes.partition import partition_spec

pytestmark = pytest.mark.skipif(not cpu_grouped.grouped_mm_on_cpu(), reason="this torch has no CPU _grouped_mm")


@pytest.fixture(autouse=True, scope="module")
def few_sub_experts_too():
    """``MIN_SUB_EXPERTS`` is a speed rule, not a semantic one: the small blocks here take the grouped path too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_grouped, "MIN_SUB_EXPERTS", 1)
        yield


def aligned(spec, P: int, hidden: int, neurons: int):
    """The block with hidden and per-group intermediate sizes that keep every row 16-byte aligned, 3-D experts."""
    experts = spec.experts
    if experts.layout == "list":
        experts = ExpertsSpec(layout="separate", transposed=experts.transposed, has_bias=experts.has_bias,
                              activation=experts.activation)
    spec = spec.replace(hidden=hidden, intermediate=P * neurons, experts=experts)
    return spec.replace(slots=slots_of(spec))


@given(block=blocks(), transform=st.sampled_from(["partial", "complete"]), seed=st.integers(0, 2**31),
       tokens=st.sampled_from([1, 5, 16]), hidden=st.sampled_from([8, 16]), neurons=st.sampled_from([4, 8]),
       drop=st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_grouped_experts_equal_the_loop(block, transform, seed, tokens, hidden, neurons, drop):
    spec, P = block
    spec = aligned(spec, P, hidden, neurons)
    if transform == "complete" and spec.routing.score_after_topk:
        transform = "partial"
    spec = partition_spec(spec, P, transform)
    params = random_params(spec, seed, torch.float32)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))
    _, weights, index = reference.route(x, params, spec)
    if spec.transform == "partial":
        index, weights = reference.partial_transform(index, weights, spec.partition)
    keep = torch.rand(index.shape, generator=torch.Generator().manual_seed(seed + 2)) > 0.3 if drop else None
    interleaved_transposed = spec.experts.interleaved and spec.experts.transposed  # no unit stride: the loop runs
    assert cpu_grouped.covers(x, params, spec, index.numel()) != interleaved_transposed
    got = cpu_grouped.experts(x, index, weights, params, spec, keep)
    want = reference.experts(x.double(), index, weights.double(), [p.double() for p in params], spec, keep)
    assert got.dtype == x.dtype and torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5 or want.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_experts_in_16_bits(dtype):
    """16-bit activations: within 16-bit rounding of the fp64 loop, like the loop itself."""
    spec = MoESpec(name="b16", num_experts=16, top_k=4, hidden=64, intermediate=32,
                   slots=("router_weight", "gate_up", "down"))
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(16, 64, generator=g).to(dtype), (torch.randn(16, 64, 64, generator=g) / 8).to(dtype),
              (torch.randn(16, 64, 32, generator=g) / 6).to(dtype)]
    x = torch.randn(40, 64, generator=g).to(dtype)
    _, weights, index = reference.route(x, params, spec)
    assert cpu_grouped.covers(x, params, spec, index.numel())
    want = reference.experts(x.double(), index, weights.double(), [p.double() for p in params], spec)
    loop = reference.experts(x, index, weights, params, spec)
    got = cpu_grouped.experts(x, index, weights, params, spec)
    assert got.dtype == dtype and rel_err(got, want) < 1e-2 and rel_err(got, want) < 2 * rel_err(loop, want) + 1e-3


def test_many_rows_per_expert_run_the_loop_and_fp64_too():
    """Past ``MAX_ROWS_PER_EXPERT`` rows per expert, and for fp64, ``covers`` says no and the loop runs (bit for bit)."""
    spec = MoESpec(name="big", num_experts=2, top_k=1, hidden=8, intermediate=8, slots=("router_weight", "gate_up", "down"))
    g = torch.Generator().manual_seed(6)
    params = [torch.randn(2, 8, generator=g), torch.randn(2, 16, 8, generator=g), torch.randn(2, 8, 8, generator=g)]
    for x in (torch.randn(2 * cpu_grouped.MAX_ROWS_PER_EXPERT + 1, 8, generator=g), torch.randn(4, 8).double()):
        p = [t.to(x.dtype) for t in params]
        _, weights, index = reference.route(x, p, spec)
        assert not cpu_grouped.covers(x, p, spec, index.numel())
        assert torch.equal(cpu_grouped.experts(x, index, weights, p, spec), reference.experts(x, index, weights, p, spec))


def test_auto_on_cpu_compiles_to_the_grouped_experts(monkeypatch):
    """``kernels="auto"`` on CPU inputs runs the grouped products, ``kernels="reference"`` the loop; both give eager's
    answer."""
    from models import hf_model, random_ids

    calls = []
    real = cpu_grouped._product
    monkeypatch.setattr(cpu_grouped, "_product", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = hf_model("olmoe", "grouped_mm")
    ids = random_ids()
    with torch.no_grad():
        want = model(ids).logits
        for kernels, grouped in (("auto", True), ("reference", False)):
            torch._dynamo.reset()
            calls.clear()
            got = torch.compile(model, backend="dualsparse", options={"kernels": kernels, "inner": "eager"})(ids).logits
            assert bool(calls) == grouped, kernels
            assert rel_err(got, want) < 1e-5
    assert dsmoe_compiler.last_report().rewritten
