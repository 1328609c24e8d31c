"""PhiMoE's router (``sparsemixer``) as one route call: ``reference.sparsemixer`` is transformers' function at
inference op for op, the model compiles to one operator per MoE layer with eager's answer, and training mode (where
sparsemixer samples) keeps transformers' own router."""

import pytest
import torch
from conftest import rel_err
from models import eager_and_compiled, hf_model, moe_layer_count, random_ids, triton_bf16_errors

import dsmoe_compiler
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import MoESpec, RoutingSpec
from dsmoe_compiler.passes.partition import partition_spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("jitter_eps", [0.01, 0.3])
def test_sparsemixer_is_transformers_at_inference(dtype, jitter_eps):
    """Bit for bit, on logits where many lie near each round's threshold (ties to the best included)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(500, 16, generator=g) * 2).to(dtype)
    logits[::7, 3] = logits[::7, 5]  # exact ties
    logits[1::5, 2] = logits[1::5].max(dim=-1).values * (1 - 2 * jitter_eps)  # at the first round's threshold
    expected_w, expected_i = sparsemixer(logits, jitter_eps=jitter_eps, training=False)
    got_w, got_i = reference.sparsemixer(logits, jitter_eps)
    assert torch.equal(got_i, expected_i) and torch.equal(got_w, expected_w)
    assert ((expected_w.float() - 1).abs() > 1e-3).float().mean() > 0.1  # the rounds' softmax spans several logits


def test_phimoe_is_captured_exactly():
    model = hf_model("phimoe", None)
    expected, got, report = eager_and_compiled(model, random_ids())
    assert len(report.rewritten) == moe_layer_count(model) > 0 and not report.left_alone, str(report)
    assert all(b.variant.startswith("sparsemixer") for b in report.rewritten)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_phimoe_bf16_and_partial_partition():
    model = hf_model("phimoe", None).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(random_ids()).logits.double()
        for options in ({"inner": "eager"}, {"inner": "eager", "partition": 2, "transform": "partial"}):
            torch._dynamo.reset()
            got = torch.compile(model, backend="dualsparse", options=options)(random_ids()).logits.double()
            assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-2, options


def test_training_mode_keeps_the_sampling_router():
    """In training mode sparsemixer samples: the router keeps its own forward and the experts take the routing it
    samples as given. Seeded alike, eager and compiled draw the same experts (compiling, whose checks run the graph,
    leaves the random state alone)."""
    model = hf_model("phimoe", None).train()
    ids = random_ids()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dualsparse", options={"inner": "eager"})
    torch.manual_seed(0)
    with torch.no_grad():
        got = compiled(ids).logits
        torch.manual_seed(0)
        expected = model(ids).logits
        other = model(ids).logits  # another draw: the comparison above is not between two fixed routings
    assert all(b.variant.split()[0] == "given" for b in dsmoe_compiler.last_report().rewritten)
    assert len(dsmoe_compiler.last_report().rewritten) == moe_layer_count(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(other, expected, rtol=1e-3, atol=1e-3)


def test_complete_transformation_is_refused():
    spec = MoESpec(name="moe", num_experts=8, top_k=2, hidden=32, intermediate=48,
                   routing=RoutingSpec(score_func="sparsemixer", jitter_eps=0.01), slots=("router_weight",))
    with pytest.raises(ValueError, match="'transform'"):
        partition_spec(spec, 2, "complete")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_phimoe_triton_kernels_bf16_on_gpu():
    assert max(triton_bf16_errors("phimoe")) < 1e-2
