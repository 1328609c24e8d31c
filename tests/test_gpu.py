"""GPU only: compiled transformers models with the Triton kernels give eager's answer in bf16."""

import pytest
import torch
from models import ARCHITECTURES, VOCAB, hf_model, moe_layer_count

import dsmoe_compiler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


GPT_OSS_BF16 = pytest.mark.xfail(strict=True, reason=(
    "known defect (H100, torch 2.11): tiny random GPT-OSS in bf16 through the Triton kernels is 2.6e-2 from fp32 "
    "where transformers' bf16 is 1.3e-2; the layer alone matches the reference at 4.5e-3"))


@pytest.mark.parametrize("arch", [pytest.param(a, marks=GPT_OSS_BF16) if a == "gpt_oss" else a for a in ARCHITECTURES])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_triton_kernels_match_eager_in_bf16(arch, impl):
    """bf16 logits within 1e-2 of eager bf16, or (where transformers' own bf16 is further than that from
    fp32, as for the tiny random GPT-OSS) no further from the fp32 answer than transformers' bf16 is."""
    model = hf_model(arch, impl).to("cuda")
    ids = torch.randint(3, VOCAB, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
        model.to(torch.bfloat16)
        expected = model(ids).logits
        got = torch.compile(model, backend="dualsparse", options={"kernels": "triton", "inner": "eager"})(ids).logits
    assert torch.isfinite(got).all()
    ours, theirs, between = _rel(got, exact), _rel(expected, exact), _rel(got, expected)
    print(f"{arch}/{impl}: ours-vs-eager-bf16 {between:.2e}, vs fp32: ours {ours:.2e}, transformers bf16 {theirs:.2e}")
    assert between < 1e-2 or ours <= 1.25 * theirs
    assert len(dsmoe_compiler.last_report().rewritten) == moe_layer_count(model)


@pytest.mark.parametrize("mode", ["1t", "2t"])
def test_triton_drop_matches_reference_drop(mode):
    """Same thresholds, same routing: the Triton path drops the same pairs as the reference."""
    model = hf_model("olmoe", "grouped_mm").to("cuda", torch.float32)
    ids = torch.randint(3, VOCAB, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    outs = {}
    for kernels in ("reference", "triton"):
        torch._dynamo.reset()
        opts = {"kernels": kernels, "inner": "eager", "drop": mode, "threshold": 0.45, "stats": True}
        with torch.no_grad():
            outs[kernels] = torch.compile(model, backend="dualsparse", options=opts)(ids).logits
        outs[kernels + "_rate"] = dsmoe_compiler.drop_stats()["overall"]["drop_rate"]
    assert outs["triton_rate"] == outs["reference_rate"] > 0
    assert _rel(outs["triton"], outs["reference"]) < 1e-4
