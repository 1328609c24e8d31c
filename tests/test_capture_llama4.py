"""Llama-4's MoE block (its own experts, routing weight on the expert input) is captured as one MoE operator with
the shared expert folded in (``transformers_hf.llama4_moe_forward``), and gives eager's answer."""

import pytest
import torch
import torch.nn as nn
from conftest import graph_breaks, rel_err
from models import eager_and_compiled, hf_model, moe_layer_count, random_ids, triton_bf16_errors

import dsmoe_compiler


def test_llama4_block_is_captured_exactly():
    model = hf_model("llama4", None)
    expected, got, report = eager_and_compiled(model, random_ids())
    assert len(report.rewritten) == moe_layer_count(model) > 0, str(report)
    assert not report.left_alone and report.graphs == 1 and graph_breaks() == ({}, {}), str(report)
    assert all("weight-on-input" in b.variant and "shared" in b.variant for b in report.rewritten), str(report)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_llama4_bf16_and_a_partition():
    """bf16 (the input scaled in bf16, as Llama-4 does) and P = 2 (weight on the input of both halves)."""
    model = hf_model("llama4", None).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(random_ids()).logits
        for options in ({"inner": "eager"}, {"inner": "eager", "partition": 2}):
            torch._dynamo.reset()
            got = torch.compile(model, backend="dualsparse", options=options)(random_ids()).logits
            assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-2, options


def test_llama4_unknown_activation_is_left_alone():
    model = hf_model("llama4", None)
    for m in model.modules():
        if type(m).__name__ == "Llama4TextExperts":
            m.act_fn = nn.Tanh()
    with torch.no_grad():
        expected = model(random_ids()).logits
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="activation Tanh not supported"):
            got = torch.compile(model, backend="dualsparse", options={"inner": "eager"})(random_ids()).logits
    assert not dsmoe_compiler.last_report().rewritten
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_llama4_triton_kernels_bf16_on_gpu():
    assert max(triton_bf16_errors("llama4")) < 1e-2
