"""Routers written as plain ops in front of transformers' experts (``capture/route_graph.py``): each pattern the
pass reads is captured with eager's answer and the dtypes read off the graph, and routers it cannot express are
left alone, exact, with the step that did not match."""

import json
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import graph_breaks, rel_err

import dsmoe_compiler
from dsmoe_compiler.capture import route_graph
from dsmoe_compiler.capture.fuse_markers import ROUTE
from dsmoe_compiler.capture.transformers_hf import TransformersCapture

E, K, H = 8, 3, 32


def _hy_v3(m, x):  # fp32 logits, sigmoid, selection bias, renormalised with eps, scaled (HY-V3, DeepSeek-V3 style)
    scores = torch.sigmoid(F.linear(x.float(), m.weight.float()))
    index = torch.topk(scores + m.bias, K, dim=-1, sorted=False)[1]
    w = scores.gather(1, index)
    return index, w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 2.5


def _minimax_m2(m, x):  # logits in the model's dtype, sigmoid in fp32, in-place renormalisation, fp32 weights
    scores = F.sigmoid(F.linear(x.to(m.weight.dtype), m.weight).float())
    index = torch.topk(scores + m.bias, K, dim=-1, sorted=False)[1]
    w = scores.gather(1, index)
    w /= w.sum(dim=-1, keepdim=True)
    return index, w


def _ernie(m, x):  # fp32 softmax, a [1, E] bias squeezed, renormalisation clamped from below, cast back
    probs = F.softmax(F.linear(x.float(), m.weight.float()), dim=1, dtype=torch.float)
    index = torch.topk(probs + m.bias.view(1, E).squeeze(), K, dim=-1)[1]
    w = torch.gather(probs, dim=-1, index=index)
    return index, (w / torch.clamp(w.sum(dim=-1, keepdim=True), min=m.norm_min)).to(x.dtype)


def _lfm2(m, x):  # sigmoid in the model's dtype, gather then type_as, eps, scale
    logits = F.linear(x, m.weight)
    scores = logits.sigmoid()
    index = torch.topk(scores + m.bias, k=K, dim=-1)[1]
    w = torch.gather(scores, dim=1, index=index).type_as(logits)
    return index, w / (w.sum(dim=-1, keepdim=True) + 1e-6) * 1.7


def _flint(m, x):  # top-k values of fp32 sigmoid scores, renormalised
    w, index = torch.topk(F.linear(x.float(), m.weight.float()).sigmoid(), K, dim=-1)
    return index, w / w.sum(dim=-1, keepdim=True)


def _gemma4(m, x):  # its own input (a norm of x, scaled), fp32 softmax, top-k values renormalised, per-expert scale
    h = F.rms_norm(x, (H,), eps=1e-6) * m.router_scale * H ** -0.5
    probs = F.softmax(F.linear(h, m.weight), dim=-1, dtype=torch.float32)
    w, index = torch.topk(probs, k=K, dim=-1)
    w /= w.sum(dim=-1, keepdim=True)
    return index, w * m.per_expert_scale[index]


def _own_input(m, x):  # the router reads another tensor of the same shape than the experts
    scores = F.linear(x * 2, m.weight).softmax(dim=-1, dtype=torch.float32)
    w, index = torch.topk(scores, K, dim=-1)
    return index, w


# routers the operator cannot express: the experts take the routing the graph computes (score_func "given"), exact,
# and the log names the step route_graph could not read
def _softcapped(m, x):
    logits = torch.tanh(F.linear(x, m.weight) / 3.0) * 3.0
    scores = logits.sigmoid()
    index = torch.topk(scores + m.bias, K, dim=-1)[1]
    return index, scores.gather(1, index)


def _tensor_scale(m, x):
    scores = F.linear(x, m.weight).sigmoid()
    index = torch.topk(scores + m.bias, K, dim=-1)[1]
    return index, scores.gather(1, index) * m.norm_min_tensor


def _bias_on_logits(m, x):  # Kolibri: selection on logits + bias, weights the sigmoid of the selected logits
    logits = F.linear(x, m.weight)
    index = torch.topk(logits + m.bias, K, dim=-1)[1]
    return index, logits.gather(1, index).sigmoid()


def _divided_by_max(m, x):
    scores = F.linear(x, m.weight).sigmoid()
    w, index = torch.topk(scores, K, dim=-1)
    return index, w / w.max(dim=-1, keepdim=True).values


def _half_input(m, x):  # a router of half the channels: not a [tokens, hidden] router input
    scores = F.linear(x[:, : H // 2], m.half_weight).softmax(dim=-1)
    w, index = torch.topk(scores, K, dim=-1)
    return index, w


def _dbrx(m, x):  # softmax in the logits' dtype, top-k values divided by their 1-norm
    scores = F.softmax(F.linear(x, m.weight), dim=1, dtype=x.dtype)
    w, index = torch.topk(scores, K, dim=-1)
    return index, w / torch.norm(w, p=1, dim=-1, keepdim=True)


def _two_norm(m, x):  # DBRX with moe_normalize_expert_weights=2: not a renormalisation
    scores = F.softmax(F.linear(x, m.weight), dim=1, dtype=x.dtype)
    w, index = torch.topk(scores, K, dim=-1)
    return index, w / torch.norm(w, p=2, dim=-1, keepdim=True)


CAPTURED = {"hy_v3": _hy_v3, "minimax_m2": _minimax_m2, "ernie": _ernie, "lfm2": _lfm2, "flint": _flint,
            "gemma4": _gemma4, "own_input": _own_input, "dbrx": _dbrx}
GIVEN = {"softcapped": (_softcapped, "router linear"), "tensor_scale": (_tensor_scale, "scaled by a tensor"),
              "bias_on_logits": (_bias_on_logits, "selection bias on raw logits"),
              "divided_by_max": (_divided_by_max, "other than their sum"),
              "two_norm": (_two_norm, "other than their sum"),
              "half_input": (_half_input, "another shape than the experts' input")}
ROUTERS = {**CAPTURED, **{name: router for name, (router, _) in GIVEN.items()}}


class PlainRouterBlock(nn.Module):
    """transformers' Qwen3-MoE experts behind a router written as plain torch ops."""

    def __init__(self, router, norm_min=1e-12, impl="grouped_mm"):
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=24, num_experts=E, num_experts_per_tok=K)
        config._experts_implementation = impl
        self.router, self.norm_min = router, norm_min
        self.experts = Qwen3MoeExperts(config)
        self.weight = nn.Parameter(torch.randn(E, H) * 0.3)
        self.bias = nn.Buffer(torch.randn(E) * 0.1)
        self.norm_min_tensor = nn.Buffer(torch.tensor(1.3))
        self.router_scale = nn.Parameter(1 + 0.2 * torch.randn(H))
        self.per_expert_scale = nn.Parameter(1 + 0.3 * torch.randn(E))
        self.half_weight = nn.Parameter(torch.randn(E, H // 2) * 0.3)
        with torch.no_grad():
            for p in self.experts.parameters():
                p.normal_(0, 0.2)

    def forward(self, h):
        x = h.view(-1, H)
        index, weights = self.router(self, x)
        if self.router is _gemma4:  # Gemma-4's experts read a norm of their own of the residual
            x = F.rms_norm(x, (H,), eps=1e-6) * 1.1
        return self.experts(x, index, weights).view_as(h) + h


def _block(router, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return PlainRouterBlock(router, **kw).to(dtype).eval()


def _compiled(block, h):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(block, backend="dualsparse", options={"inner": "eager"})(h)


@pytest.mark.parametrize("name", sorted(CAPTURED))
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_plain_router_is_captured(name, impl):
    """Rewritten into one MoE operator, one graph, eager's answer (fp32)."""
    block = _block(CAPTURED[name], impl=impl, norm_min=0.9 if name == "ernie" else 1e-12)
    h = torch.randn(2, 11, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(h)
    got = _compiled(block, h)
    report = dsmoe_compiler.last_report()
    assert len(report.rewritten) == 1 and not report.left_alone, str(report)
    assert report.graphs == 1 and graph_breaks() == ({}, {})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _route_specs(block, h):
    """The route specs ``capture_plain_routers`` writes into the graph of ``block`` (markers from transformers)."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with TransformersCapture(), torch.no_grad():
        torch.compile(block, backend=grab)(h)
    (gm, example_inputs), = graphs
    assert route_graph.capture_plain_routers(gm, example_inputs) == 1
    return [json.loads(n.args[2])["routing"] for n in gm.graph.nodes if route_graph._is(n, ROUTE)]


@pytest.mark.parametrize("name, expected", [
    ("hy_v3", dict(score_func="sigmoid", score_bias=True, renormalize=True, renorm_eps=1e-20, scale=2.5,
                   logits_fp32=True, scores_fp32=False, weights_fp32=True)),
    ("minimax_m2", dict(score_func="sigmoid", score_bias=True, renormalize=True, renorm_eps=0.0,
                        logits_fp32=False, scores_fp32=True, weights_fp32=True)),
    ("ernie", dict(score_func="softmax", score_bias=True, renormalize=True, renorm_min=0.9, logits_fp32=True,
                   weights_fp32=False)),
    ("lfm2", dict(score_func="sigmoid", score_bias=True, renorm_eps=1e-6, scale=1.7, logits_fp32=False,
                  scores_fp32=False, weights_fp32=False)),
    ("flint", dict(score_func="sigmoid", score_bias=False, renormalize=True, logits_fp32=True, weights_fp32=True)),
    ("gemma4", dict(score_func="softmax", renormalize=True, expert_scale=True, logits_fp32=False, weights_fp32=True,
                    softmax_in_logits_dtype=False)),
    ("dbrx", dict(score_func="softmax", logits_fp32=False, weights_fp32=False, softmax_in_logits_dtype=True)),
])
def test_spec_read_off_the_graph(name, expected):
    """bf16 model: the precision of each routing step is read from the graph's dtypes."""
    block = _block(CAPTURED[name], torch.bfloat16, norm_min=0.9 if name == "ernie" else 1e-12)
    h = torch.randn(2, 11, H, generator=torch.Generator().manual_seed(2)).bfloat16()
    (routing,) = _route_specs(block, h)
    assert {k: routing[k] for k in expected} == expected


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_plain_router_bf16(name):
    """bf16 end to end: the compiled block matches eager to bf16 rounding (the experts sum in another order)."""
    block = _block(CAPTURED[name], torch.bfloat16, norm_min=0.9 if name == "ernie" else 1e-12)
    h = torch.randn(3, 16, H, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        expected = block(h).double()
    got = _compiled(block, h).double()
    assert len(dsmoe_compiler.last_report().rewritten) == 1
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("name", sorted(GIVEN))
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_inexpressible_router_is_given(name, impl, caplog):
    router, reason = GIVEN[name]
    block = _block(router, impl=impl)
    h = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = block(h)
    with caplog.at_level(logging.INFO, logger="dsmoe_compiler"):
        got = _compiled(block, h)
    report = dsmoe_compiler.last_report()
    assert len(report.rewritten) == 1 and not report.left_alone, str(report)
    assert report.rewritten[0].variant.startswith("given") and report.counters["given_routing"] == 1, str(report)
    assert reason in caplog.text, caplog.text
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_spec_that_does_not_reproduce_is_refused():
    """The numerical guard: the parsed spec with one field changed no longer passes ``_reproduces``."""
    import dataclasses

    block = _block(_hy_v3)
    h = torch.randn(2, 11, H, generator=torch.Generator().manual_seed(6))
    graphs = []
    torch._dynamo.reset()
    with TransformersCapture(), torch.no_grad():
        torch.compile(block, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward)(h)
    (gm, example_inputs), = graphs
    experts = next(n for n in gm.graph.nodes if route_graph._is(n, route_graph.EXPERTS))
    router = route_graph.read_router(experts)
    spec = router.spec()
    value_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    values = route_graph.recorded_values(gm, example_inputs, {router.x, *experts.args[1:3]})
    assert route_graph._reproduces(router, spec, values, value_of)
    for change in (dict(scale=2.4), dict(renormalize=False), dict(score_bias=False), dict(score_func="softmax")):
        wrong = spec.replace(routing=dataclasses.replace(spec.routing, **change))
        reading = router
        if not wrong.routing.score_bias:
            wrong = wrong.replace(slots=("router_weight",))
            reading = dataclasses.replace(router, score_bias=None)
        assert not route_graph._reproduces(reading, wrong, values, value_of), change


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_plain_router_triton_kernels_bf16_on_gpu(name):
    """The route kernel (scores_fp32: an unrounded fp32 sigmoid), torch routing for the clamped renormalisation, or
    the graph's own routing (``GIVEN``), then the grouped GEMMs: eager's bf16 answer within 1e-2, over three calls
    (the second captures the operator's CUDA graph, the third replays it with new ids and weights copied in)."""
    from dsmoe_compiler.codegen import dispatch

    block = _block(ROUTERS[name], torch.bfloat16, norm_min=0.9 if name == "ernie" else 1e-12).to("cuda")
    generator = torch.Generator("cuda").manual_seed(7)
    dispatch._PLANS.clear()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="dualsparse", options={"kernels": "triton", "inner": "eager"})
    for call in range(3):
        h = torch.randn(3, 50, H, device="cuda", generator=generator).bfloat16()
        with torch.no_grad():
            expected = block(h).double()
            got = compiled(h).double()
        assert torch.isfinite(got).all()
        err = rel_err(got, expected)
        print(f"{name} call {call}: ours-vs-eager-bf16 {err:.2e}")
        assert err < 1e-2
    assert len(dsmoe_compiler.last_report().rewritten) == 1
    assert len(dispatch._PLANS) > 0, "the reference loop ran instead of the kernels"
    assert any(plan.graph is not None for plan in dispatch._PLANS.values()), "no graph replay"


def test_gemma4_is_captured_exactly():
    """Gemma-4: a router reading a norm of the residual, with a per-expert scale, in front of experts reading
    another norm of it: one operator per MoE layer, eager's logits."""
    from models import eager_and_compiled, hf_model, moe_layer_count, random_ids

    model = hf_model("gemma4", None)
    expected, got, report = eager_and_compiled(model, random_ids())
    assert len(report.rewritten) == moe_layer_count(model) > 0, str(report)
    assert not report.left_alone and report.graphs == 1, str(report)
    assert all("own-router-input" in b.variant and "expert-scale" in b.variant for b in report.rewritten)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_gemma4_triton_kernels_bf16_on_gpu():
    from models import triton_bf16_errors

    from dsmoe_compiler.codegen import dispatch

    assert max(triton_bf16_errors("gemma4", calls=3)) < 1e-2  # calls 2 and 3 capture and replay with a new router input
    assert any(plan.graph is not None for plan in dispatch._PLANS.values()), "no graph replay with a router input"
