"""Routers that models copy from a known class under their own name are recognised by their code, and experts the
backend cannot describe fall back instead of failing (benchmarks/capture_survey.py found both)."""

import importlib.util
import inspect
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_breaks
from models import VOCAB, hf_model, moe_layer_count

import dsmoe_compiler
from dsmoe_compiler.capture import transformers_hf as hf


OWN_READERS = {"qwen3_5_moe", "mistral4", "aria"}  # routers with a reader of their own in ROUTERS


@pytest.mark.parametrize("arch, known", [("glm4_moe", "DeepseekV3TopkRouter"), ("flex_olmo", "OlmoeTopKRouter"),
                                         ("minimax", "MixtralTopKRouter"), ("qwen3_5_moe", "Qwen3_5MoeTopKRouter"),
                                         ("mistral4", "Mistral4TopkRouter"), ("aria", "AriaTextTopKRouter")])
def test_copied_router_is_captured(arch, known):
    """Every MoE block rewritten, eager's logits; the router is a known class or a copy of one under the model's name."""
    import transformers

    if not hasattr(transformers.models, arch):  # newer than the installed transformers
        pytest.skip(f"{arch} is not in transformers {transformers.__version__}")
    model = hf_model(arch, None)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend="dualsparse", options={"inner": "eager"})(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    report = dsmoe_compiler.last_report()
    if arch == "aria" and moe_layer_count(model) == 0:  # transformers 5.17: Aria's own experts layers, not captured
        assert not report.rewritten, str(report)
        return
    assert len(report.rewritten) == moe_layer_count(model) > 0, str(report)
    assert not report.left_alone and report.graphs == 1 and graph_breaks() == ({}, {}), str(report)
    router = next(type(m) for m in model.modules() if type(m).__name__.endswith(("TopkRouter", "TopKRouter")))
    assert (router, known) in hf._router_classes()
    assert (router.__name__ == known) == (arch in OWN_READERS)


def _module_from_source(tmp_path, name: str, source: str):
    """A file-backed module registered as ``name`` (inspect.getsource needs a file)."""
    path = tmp_path / (name.rsplit(".", 1)[-1] + ".py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_only_identical_code_is_recognised(tmp_path):
    """A verbatim copy of OLMoE's router is taken for it; one changed token, or a changed helper, is not."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    forward = textwrap.indent(textwrap.dedent(inspect.getsource(OlmoeTopKRouter.forward)), "    ")
    assert "softmax" in forward
    source = "\n".join([
        "import torch", "import torch.nn.functional as F", "from torch import nn", "",
        "class CopyRouter(nn.Module):", forward, "",
        "class AlteredRouter(nn.Module):", forward.replace("softmax", "log_softmax"), "",
        "def helper(x):", "    return x", "",
        "class HelperRouter(nn.Module):", forward + "\n    def extra(self, x):\n        return helper(x)\n"])
    name = "transformers.models.dsmoe_fake.modeling_dsmoe_fake"
    try:
        module = _module_from_source(tmp_path, name, source)
        found = dict(hf._routers_in(name))
        assert found == {module.CopyRouter: "OlmoeTopKRouter"}, found
    finally:
        sys.modules.pop(name, None)
        hf._routers_in.cache_clear()


class _NoGateExperts(torch.nn.Module):
    """Like NemotronH's experts: up and down projections only (has_gate=False), no gate_up_proj."""
    has_gate, is_concatenated, is_transposed, has_bias = False, True, False, False

    def __init__(self):
        super().__init__()
        from transformers.integrations.moe import _default_apply_gate

        type(self)._apply_gate = _default_apply_gate  # what transformers' experts decorator gives its classes
        self.up_proj = torch.nn.Parameter(torch.randn(4, 6, 8))
        self.down_proj = torch.nn.Parameter(torch.randn(4, 8, 6))
        self.act_fn = torch.nn.ReLU()


def test_experts_without_gate_are_described_or_fall_back_with_their_reason():
    """Gate-less experts (NemotronH) with a known activation become one experts call computing
    sum_k w_k down_e(act(up_e x)); with an activation we do not know they keep their own forward and say why."""
    experts, h = _NoGateExperts(), torch.randn(5, 8)
    index, weights = torch.rand(5, 4).argsort(dim=-1)[:, :2], torch.rand(5, 2)
    calls = []

    def fallback(module, hidden, top_k_index, top_k_weights):
        calls.append(module)
        return hidden * 2

    with torch.no_grad():
        out = hf.experts_forward(experts, h, index, weights, fallback=fallback)
        expected = torch.zeros_like(h)
        for t in range(5):
            for k in range(2):
                e = index[t, k]
                expected[t] += weights[t, k] * (experts.down_proj[e] @ torch.relu(experts.up_proj[e] @ h[t]))
    assert calls == []
    torch.testing.assert_close(out, expected)
    experts.act_fn = torch.nn.Tanh()
    out = hf.experts_forward(experts, h, index, weights, fallback=fallback)
    assert calls == [experts]
    torch.testing.assert_close(out, h * 2)
    plan = hf.experts_plan("_NoGateExperts", hf._experts_facts(experts), (4, 6, 8), 2)
    assert isinstance(plan, str) and "without a gate, activation Tanh" in plan


@pytest.mark.parametrize("fn, name", [(F.silu, "silu"), (F.relu, "relu"), (torch.relu, "relu"), (F.gelu, "gelu")])
def test_activation_functions_are_described(fn, name):
    """A model may set ``act_fn = F.silu`` (LFM2-MoE) instead of an activation module."""
    facts = dict(zip(hf._EXPERTS_FACTS, ("default", hf._activation_name(fn), True, False, False, True, False, False,
                                         1.702, 7.0, None, 0)))
    assert hf.describe_facts(facts).activation == name
    facts["act_name"] = hf._activation_name(lambda x: x)
    assert isinstance(hf.describe_facts(facts), str)
