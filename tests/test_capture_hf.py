"""Spine: every transformers MoE architecture, in every experts implementation, reaches the backend whole."""

import pytest
import torch
from conftest import graph_breaks, rel_err
from models import ARCHITECTURES, IMPLEMENTATIONS, VOCAB, hf_model, moe_layer_count

import dsmoe_compiler

EAGER_INNER = {"inner": "eager"}
SHARED_EXPERTS = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}


def _close(a, b, rtol=1e-4):
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_logits_match_eager(arch, impl):
    model = hf_model(arch, impl)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend="dualsparse", options=EAGER_INNER)(ids).logits
    _close(got, expected)
    report = dsmoe_compiler.last_report()
    assert len(report.rewritten) == moe_layer_count(model), str(report)
    assert not report.left_alone, str(report)
    assert graph_breaks() == ({}, {})
    assert report.graphs == 1
    # shared experts (Qwen2-MoE, DeepSeek) are folded into the operator, the others have none
    assert all(("shared" in b.variant) == (arch in SHARED_EXPERTS) for b in report.rewritten), str(report)


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_prefill_then_decode_with_kv_cache(arch):
    """Prefill 7 tokens, then 4 decode steps of 1 token: same logits as eager, and a bounded number of graphs."""
    model = hf_model(arch, "grouped_mm")
    compiled = torch.compile(model, backend="dualsparse", options=EAGER_INNER)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = {}
        for name, fn in (("eager", model), ("compiled", compiled)):
            out = fn(ids, use_cache=True)
            cache, logits, step = out.past_key_values, [out.logits], out.logits[:, -1:].argmax(-1)
            for _ in range(4):
                out = fn(step, past_key_values=cache, use_cache=True)
                cache, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
            outs[name] = logits
    for got, expected in zip(outs["compiled"], outs["eager"]):
        _close(got, expected)
    report = dsmoe_compiler.last_report()
    assert graph_breaks() == ({}, {})
    # one graph for prefill, one for the first decode step, one dynamic-shape recompile at most
    assert report.graphs <= 3, report.graphs
    assert len(report.rewritten) == report.graphs * moe_layer_count(model)
    assert "fold_shared_failed" not in report.counters
    assert all(("shared" in b.variant) == (arch in SHARED_EXPERTS) for b in report.rewritten), str(report)


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_generate_with_a_static_cache(attention):
    """``generate`` with transformers' static cache (the cache it recommends under torch.compile) writes the cache and
    its position counter in place inside the graph; the compile-time check run of the shared-expert fold must leave
    them alone (it once advanced the counter: an ``index_copy_`` out of bounds, or keys at the wrong positions).
    Flex attention puts a higher-order op in the graph, which the check run takes outside its dispatch mode."""
    model = hf_model("qwen2_moe", "grouped_mm")
    model.set_attn_implementation(attention)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        model.forward = torch.compile(model.forward, backend="dualsparse", options=EAGER_INNER)
        got = model.generate(ids, **settings)
    assert torch.equal(got, expected)
    report = dsmoe_compiler.last_report()
    assert report.counters["fold_shared"] == len(report.rewritten), str(report)
    assert len(report.rewritten) == report.graphs * moe_layer_count(model), str(report)
    assert "fold_shared_failed" not in report.counters


def test_generate_compiles_its_decode_steps_with_dualsparse():
    """transformers' own compile of the decode steps (``CompileConfig``, taken on GPUs with a static cache) with our
    backend: ``mode=None``, since torch.compile refuses ``mode`` beside ``options`` (ours takes it inside them)."""
    from transformers import CompileConfig

    model = hf_model("qwen2_moe", "grouped_mm")
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    config = CompileConfig(backend="dualsparse", mode=None, options=EAGER_INNER)
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        got = model.generate(ids, compile_config=config, **settings)
    assert torch.equal(got, expected)
    report = dsmoe_compiler.last_report()
    assert report.graphs >= 1 and len(report.rewritten) == report.graphs * moe_layer_count(model), str(report)


def _close_at_lengths(compiled, model, lengths):
    """The compiled model's logits are eager's on a random batch of 2 at each length."""
    with torch.no_grad():
        for length in lengths:
            ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
            _close(compiled(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch, inner", [("deepseek_v3", "aot_eager"), ("gpt_oss", "eager")])
def test_dynamic_shapes_compile_one_graph(arch, inner):
    """``torch.compile(..., dynamic=True)``: one graph serves every length, with no graph break. Dynamo makes the
    floats it reads off modules symbolic there (DeepSeek-V3's ``routed_scaling_factor``), and the router's plan,
    computed at trace time, once refused them: a graph break at every router, 16 graphs instead of 1 (GPT-OSS:
    its experts' alpha and limit, 13 graphs). Now the plan specialises the float, so AOT autograd (under aot_eager
    and inductor) restarts the compile once; the report counts the graph once."""
    model = hf_model(arch, "grouped_mm")
    compiled = torch.compile(model, backend="dualsparse", options={"inner": inner}, dynamic=True)
    _close_at_lengths(compiled, model, (5, 11))
    report = dsmoe_compiler.last_report()
    assert graph_breaks() == ({}, {})
    assert report.graphs == 1
    assert len(report.rewritten) == moe_layer_count(model) and not report.left_alone, str(report)


class _BreakBefore(torch.nn.Module):
    """A module calling ``inner`` after a graph break: ``inner`` then runs in a resumed frame whose inputs are the
    router's outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return self.inner(*args, **kwargs)


def test_experts_after_a_graph_break_under_dynamic_shapes():
    """A graph break between router and experts under ``dynamic=True``: the experts' frame gets the routing as inputs
    with symbolic shapes, so top-k is a symbol there. The experts still become one operator (specialised on top-k),
    with no graph break but the user's own, and run as ``given`` routing (the router is in the other graph)."""
    model = hf_model("qwen3_moe", "grouped_mm")
    for layer in model.model.layers:
        layer.mlp.experts = _BreakBefore(layer.mlp.experts)
    compiled = torch.compile(model, backend="dualsparse", options=EAGER_INNER, dynamic=True)
    _close_at_lengths(compiled, model, (5, 11))
    breaks, _ = graph_breaks()
    assert len(breaks) == 1 and "graph_break()" in next(iter(breaks)), breaks
    report = dsmoe_compiler.last_report()  # the layers share the experts' resumed frame, so one rewrite serves both
    assert report.rewritten and not report.left_alone, str(report)
    assert {b.variant for b in report.rewritten} == {"given"}, str(report)


def test_inductor_end_to_end():
    model = hf_model("olmoe", "grouped_mm")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend="dualsparse")(ids).logits
    _close(got, expected)
    assert len(dsmoe_compiler.last_report().rewritten) == moe_layer_count(model)


def test_patches_are_scoped_to_dualsparse_calls():
    """Outside a dualsparse call, transformers' own router forward and experts dispatch are back."""
    from transformers.integrations import moe
    from transformers.models.olmoe import modeling_olmoe

    before = (modeling_olmoe.OlmoeTopKRouter.forward, moe.ExpertsInterface.get_interface)
    model = hf_model("olmoe", "eager")
    with torch.no_grad():
        torch.compile(model, backend="dualsparse", options=EAGER_INNER)(torch.tensor([[5, 6, 7]]))
    assert (modeling_olmoe.OlmoeTopKRouter.forward, moe.ExpertsInterface.get_interface) == before


@pytest.mark.parametrize("arch, inner", [("olmoe", "eager"), ("qwen2_moe", "aot_eager")])
def test_autocast_bf16(arch, inner):
    """Under ``torch.autocast`` (fp32 weights, bf16 autocast): every block is rewritten and the logits are eager
    autocast's to bf16 rounding, no farther from the fp32 model than eager autocast's own (the operator has no
    autocast rule: what it runs inside is cast by autocast as in eager, its fp32 inputs stay fp32)."""
    model = hf_model(arch, "grouped_mm")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fp32 = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(ids).logits
            got = torch.compile(model, backend="dualsparse", options={"inner": inner})(ids).logits
    assert torch.isfinite(got).all() and got.dtype == expected.dtype
    assert rel_err(got, expected) < 1e-2
    assert rel_err(got, fp32) < 1.5 * rel_err(expected, fp32)
    assert len(dsmoe_compiler.last_report().rewritten) == moe_layer_count(model)
