"""Blocks whose routing the operator cannot express take it as the graph computes it (``fuse_markers._given_routing``),
and experts with a known GLU gate of their own (``transformers_hf._GATES``) are described by it.

DeepSeek-V4 has both: hash routing by token id in its first layers and a sqrt-softplus top-k after them (neither is a
``RoutingSpec``), and a GLU clamped before the activation. It compiles to one operator per MoE layer, shared expert
folded, with eager's answer; a partial partition and dropping act on the given routing; a complete partition, which
would repeat a router, is refused naming the option.

LongCat-Flash's zero-computation experts arrive as given ids outside the routed experts (absent pairs), Inkling-2's
softcapped GLU as a known gate, and an MoE none of this reads gets one warning (``capture/unmatched.py``)."""

import math

import pytest
import torch
from conftest import rel_err
from models import VOCAB, eager_and_compiled, hf_model, moe_layer_count, random_ids, triton_bf16_errors

import dsmoe_compiler


def _close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_deepseek_v4_is_captured_exactly():
    model = hf_model("deepseek_v4", None)
    ids = random_ids()
    expected, got, report = eager_and_compiled(model, ids)
    assert len(report.rewritten) == moe_layer_count(model) == 2 and not report.left_alone, str(report)
    assert all(b.variant.split()[0] == "given" and "silu-glu-clamped-before" in b.variant for b in report.rewritten)
    assert all("shared+clamp" in b.variant for b in report.rewritten)  # its shared MLP clamps too (next test)
    _close(got, expected)
    for module in model.modules():  # the clamp is not idle here: without it eager moves far past the tolerance
        if hasattr(module, "gate_up_proj"):
            module.limit = math.inf
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) > 1e-3


def test_a_shared_mlp_clamp_is_read_off_its_ops():
    """DeepSeek-V4's shared MLP clamps like its experts. With a limit its products never reach, the numbers alone
    cannot tell it from a plain SwiGLU, so ``fold_shared`` reads the clamps from the ops: folded with that limit, the
    operator still matches eager once the shared weights are scaled so far that the clamps act (weights are graph
    inputs: no recompile)."""
    model = hf_model("deepseek_v4", None)
    for module in model.modules():
        if hasattr(module, "limit"):
            module.limit = 1e3
    ids = random_ids()
    expected, got, report = eager_and_compiled(model, ids)
    assert report.counters["fold_shared"] == 2 and all("shared+clamp" in b.variant for b in report.rewritten)
    _close(got, expected)
    compiled = torch.compile(model, backend="dualsparse", options={"inner": "eager"})
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.shared_experts.gate_proj.weight.mul_(1e4)
            layer.mlp.shared_experts.up_proj.weight.mul_(1e4)
        expected = model(ids).logits
        got = compiled(ids).logits
    assert dsmoe_compiler.last_report().graphs == 1
    _close(got, expected)


def test_a_shared_mlp_clamped_elsewhere_is_not_folded(monkeypatch):
    """A clamp after the activation (Step-3.7's form) is not DeepSeek-V4's: the shared MLP stays plain ops."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4

    def clamped_after(self, x):
        gate = self.act_fn(self.gate_proj(x)).clamp(max=self.limit)
        return self.down_proj(gate * self.up_proj(x).clamp(min=-self.limit, max=self.limit))

    monkeypatch.setattr(dsv4.DeepseekV4MLP, "forward", clamped_after)
    model = hf_model("deepseek_v4", None)
    expected, got, report = eager_and_compiled(model, random_ids())
    assert report.counters["fold_shared"] == 0 and "shared" not in str(report), str(report)
    _close(got, expected)


def test_deepseek_v4_partial_partition_and_dropping():
    model = hf_model("deepseek_v4", None)
    ids = random_ids()
    expected, got, report = eager_and_compiled(model, ids, {"inner": "eager", "partition": 2})
    assert all("P=2(partial)" in b.variant for b in report.rewritten), str(report)
    _close(got, expected)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dualsparse", options={"inner": "eager", "drop": "1t", "threshold": 0.0,
                                                                    "stats": True})
    with torch.no_grad():
        _close(compiled(ids).logits, expected)  # T = 0 drops nothing
        dsmoe_compiler.set_thresholds(0.5, band=0.0)  # top-2 renormalised: each token's second choice goes
        dsmoe_compiler.reset_drop_stats()
        dropped = compiled(ids).logits
    # one of two routed experts dropped; the shared expert beside the operator counts in the total
    routed = 2 * model.config.moe_intermediate_size
    shared = model.model.layers[0].mlp.shared_experts.gate_proj.weight.shape[0]
    assert dsmoe_compiler.drop_stats()["overall"]["drop_rate"] == pytest.approx(routed / 2 / (routed + shared))
    assert rel_err(dropped, expected) > 1e-3


@pytest.mark.parametrize("arch", ["deepseek_v4", "gemma4", "nemotron_h", "longcat_flash", "jetmoe"])
def test_a_calibration_plan_applies(arch):
    """A plan (neuron orders) on blocks whose operator takes activations as inputs (DeepSeek-V4's given routing,
    Gemma-4's router input) or whose experts have no gate (NemotronH: the rows of up_proj are the neurons): only
    weights are permuted, the router is found for the fingerprint (Gemma-4's keeps its linear as ``router.proj``;
    JetMoE's experts are the block itself, routed by the block's own router through ``BLOCK_ROUTING``),
    P = 2 on the permuted weights stays exact, and the 2T drop rate meets a target fitted on the calibration batches
    (within 2 points; not Gemma-4, whose random per-expert scales make weights negative, nor the tiny LongCat-Flash,
    whose router leaves at most one routed pair a token, of normalised score 1, which no threshold splits)."""
    model = hf_model(arch, None)
    g = torch.Generator().manual_seed(5)
    plan = dsmoe_compiler.calibrate(model, [torch.randint(3, VOCAB, (8, 32), generator=g) for _ in range(2)],
                                    progress=False)
    held = torch.randint(3, VOCAB, (8, 32), generator=g)
    expected, got, report = eager_and_compiled(model, held, {"inner": "eager", "plan": plan, "partition": 2})
    assert report.counters["reconstruct"] == moe_layer_count(model), str(report)
    assert report.counters["reconstruct_experts_moved"] > 0, str(report)  # the exactness below is about a permutation
    _close(got, expected)
    if arch not in ("gemma4", "longcat_flash"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="dualsparse", options={"inner": "eager", "plan": plan, "drop": "2t",
                                                                        "drop_rate": 0.25, "stats": True})
        with torch.no_grad():
            compiled(held)
        assert abs(dsmoe_compiler.drop_stats()["overall"]["drop_rate"] - 0.25) < 0.02


def test_complete_partition_of_a_given_routing_is_refused():
    model = hf_model("deepseek_v4", None)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dualsparse", options={"inner": "eager", "partition": 2,
                                                                    "transform": "complete"})
    with torch.no_grad(), pytest.raises(Exception, match="'transform'='complete'.*computed by the graph"):
        compiled(random_ids())


@pytest.mark.parametrize("arch, variant", [
    ("hy_v4", "silu-glu-clamped-before"),  # HY-V4: F.silu, limit in swiglu_limit
    ("minimax_m3_vl", "clamped-swiglu"),  # GPT-OSS's gate on concatenated gate/up, swiglu_limit and swiglu_alpha
    ("beam", "given"),  # the GLU in fp32 (and a router the operator cannot express)
    ("nemotron_h", "relu2-no-gate"),  # experts without a gate: down(relu(up x)^2)
    ("inkling2", "silu-glu-clamped-softcap"),  # softcapped gate factor and up, in fp32 (act_fn takes both products)
    ("inkling2_loop", "silu-glu-clamped-softcap"),  # the same gate under another class name: matched by its code
])
def test_known_gates_are_captured_exactly(arch, variant):
    """Built as the capture survey builds them (``models.SURVEY_BUILT``: tiny config, random weights)."""
    model = hf_model(arch)
    expected, got, report = eager_and_compiled(model, random_ids())
    assert len(report.rewritten) == moe_layer_count(model) > 0 and not report.left_alone, str(report)
    assert all(variant in b.variant for b in report.rewritten), str(report)
    _close(got, expected)


def _zero_expert_pairs(model, ids) -> int:
    """Pairs the eager model routes to LongCat-Flash's zero-computation experts on ``ids``."""
    counts = []
    first = model.model.layers[0].mlp
    hook = first.router.register_forward_hook(
        lambda module, args, out: counts.append(int((out[-1] >= first.experts.num_routed_experts).sum())))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return counts[0]


def test_longcat_flash_zero_computation_experts():
    """LongCat-Flash's block: a router over routed and zero-computation experts, a pair on a zero-computation
    expert adding weight * x. The routed experts become one operator on the given routing, the identity pairs a
    weighted sum beside it; a partial partition stays exact."""
    model = hf_model("longcat_flash", None)
    ids = random_ids()
    assert _zero_expert_pairs(model, ids) > 0  # the identity path is exercised
    expected, got, report = eager_and_compiled(model, ids)
    assert len(report.rewritten) == 2 and not report.left_alone and report.graphs == 1, str(report)
    assert all(b.variant.startswith("given absent-ids") for b in report.rewritten), str(report)
    _close(got, expected)
    _, got, report = eager_and_compiled(model, ids, {"inner": "eager", "partition": 2})
    assert all("P=2(partial)" in b.variant for b in report.rewritten), str(report)
    _close(got, expected)


class ProductKeyMoE(torch.nn.Module):
    """Doge's kind of MoE block, a form we do not capture: single-neuron experts looked up in embeddings, chosen by
    product keys (the best pairs of two halves of the router's logits)."""

    def __init__(self, hidden=16, keys=4, top_k=4):
        super().__init__()
        self.keys, self.top_k = keys, top_k
        self.router = torch.nn.Linear(hidden, 2 * keys, bias=False)
        self.down_embed, self.up_embed = (torch.nn.Embedding(keys * keys, hidden) for _ in range(2))

    def forward(self, x):
        halves = self.router(x).view(*x.shape[:-1], 2, self.keys).unbind(-2)
        (sx, ix), (sy, iy) = (half.topk(self.keys // 2, dim=-1) for half in halves)
        scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
        ids = (ix.unsqueeze(-1) * self.keys + iy.unsqueeze(-2)).flatten(-2)
        scores, best = scores.topk(self.top_k, dim=-1)
        ids = ids.gather(-1, best)
        h = torch.matmul(self.down_embed(ids), x.unsqueeze(-1)).squeeze(-1)
        return torch.matmul((torch.nn.functional.silu(h) * scores.softmax(-1)).unsqueeze(-2),
                            self.up_embed(ids)).squeeze(-2)


def test_an_unmatched_moe_module_warns_once():
    """An MoE block no recogniser reads runs as plain ops, exact, with one warning for its class although two
    layers have it (``capture/unmatched.py``)."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([ProductKeyMoE(), ProductKeyMoE()])

    def model(x):
        for layer in layers:
            x = x + layer(x)
        return x

    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="ProductKeyMoE looks like an MoE block") as caught:
            got = torch.compile(model, backend="dualsparse", options={"inner": "eager"})(x)
    assert sum("ProductKeyMoE" in str(w.message) for w in caught) == 1
    report = dsmoe_compiler.last_report()
    assert not report.rewritten and len(report.left_alone) == 1, str(report)
    _close(got, expected)


def test_doge_warns():
    """Doge's own block (transformers 5.17's MoE Doge does not run: its decoder layer takes the block's tuple)."""
    model = hf_model("doge", None)
    try:
        with torch.no_grad():
            model(random_ids())
    except TypeError as error:
        pytest.skip(f"this transformers' MoE Doge does not run eagerly: {error}")
    with pytest.warns(UserWarning, match="DogeCDMoE looks like an MoE block"):
        expected, got, report = eager_and_compiled(model, random_ids())
    assert not report.rewritten and len(report.left_alone) == 1, str(report)
    _close(got, expected)


def test_a_captured_block_does_not_warn():
    """The check behind the warning above (``capture/unmatched.py``) stays quiet where every block was captured."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, _, report = eager_and_compiled(hf_model("deepseek_v4", None), random_ids())
    assert len(report.rewritten) == 2 and not report.left_alone


def test_jetmoe_block_is_captured_exactly():
    """JetMoE's MoE MLP (``transformers_hf.jetmoe_moe_forward``): its router's top-k logits with an fp32 softmax over
    them and its two ``JetMoeParallelExperts`` become one operator, its bias added after; exact, P = 2 as well. Its
    mixture of attention heads stays plain ops, reported."""
    model = hf_model("jetmoe", None)
    ids = random_ids()
    expected, got, report = eager_and_compiled(model, ids)
    assert [b.variant for b in report.rewritten] == ["softmax(topk logits)"] * 2, str(report)
    assert len(report.left_alone) == 2 and all("self_attention" in b.name for b in report.left_alone), str(report)
    _close(got, expected)
    _, got, report = eager_and_compiled(model, ids, {"inner": "eager", "partition": 2})
    assert all("P=2(partial)" in b.variant for b in report.rewritten), str(report)
    _close(got, expected)


def test_dbrx_block_is_captured_exactly():
    """DBRX's FFN (``transformers_hf.dbrx_moe_forward``): a softmax router whose top-k weights are divided by their
    1-norm, experts as 2-D [E I, H] tensors with the down projection stored [in, out] (read through a transposed view):
    one operator per layer, exact, P = 2 as well. Another p-norm is routed by DBRX's own ops (given routing); in
    training mode, where its router multiplies the input by random jitter, the block keeps its own code."""
    model = hf_model("dbrx", None)
    ids = random_ids()
    expected, got, report = eager_and_compiled(model, ids)
    assert len(report.rewritten) == moe_layer_count(model) == 2 and not report.left_alone, str(report)
    assert all(b.variant.startswith("softmax renorm") for b in report.rewritten), str(report)
    _close(got, expected)
    _, got, report = eager_and_compiled(model, ids, {"inner": "eager", "partition": 2})
    assert all("P=2(partial)" in b.variant for b in report.rewritten), str(report)
    _close(got, expected)
    ffns = [m for m in model.modules() if type(m).__name__ == "DbrxFFN"]
    for ffn in ffns:
        ffn.moe_normalize_expert_weights = 2.0
    expected, got, report = eager_and_compiled(model, ids)
    assert [b.variant.split()[0] for b in report.rewritten] == ["given"] * 2, str(report)
    _close(got, expected)
    for ffn in ffns:
        ffn.moe_normalize_expert_weights = None
    expected, got, report = eager_and_compiled(model, ids)
    assert [b.variant.split()[0] for b in report.rewritten] == ["softmax"] * 2, str(report)
    _close(got, expected)
    ffn = ffns[0]  # one FFN alone: the whole model in training mode took 16-28 s more to compile here
    ffn.router.moe_jitter_eps = 0.01
    ffn.train()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(ffn, backend="dualsparse", options={"inner": "eager"})(torch.randn(2, 5, model.config.d_model))
    report = dsmoe_compiler.last_report()
    assert not report.rewritten and any("jitter" in b.reason for b in report.left_alone), str(report)


def test_dbrx_routing_rounds_its_softmax_as_the_model_does():
    """DBRX takes its softmax in the logits' dtype. In bf16 near-equal scores round to ties, so a top-k over fp32
    scores picks other experts than the model for some tokens (a 2-3e-2 logits error on the GPU before this flag,
    ``results/h200/dbrx_layer.json``). With ``softmax_in_logits_dtype`` the reference routing is the model's own, bit
    for bit (ids and weights); without it the ids differ (the flag is not idle here)."""
    import dataclasses

    from dsmoe_compiler.codegen import reference
    from dsmoe_compiler.codegen.reference import parse_spec
    from dsmoe_compiler.capture import transformers_hf

    model = hf_model("dbrx", None).to(torch.bfloat16)
    ffn = next(m for m in model.modules() if type(m).__name__ == "DbrxFFN")
    x = torch.randn(4096, ffn.experts.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        ffn.router.layer.weight.mul_(0.05)  # logits near each other: scores near 1/E, many bf16 ties
        want_w, want_i = ffn.route_tokens_to_experts(ffn.router(x))
    route_json, _ = transformers_hf.dbrx_plan("SiLUActivation", 1.0, False, 8, 24, 32, 2, 8)
    spec = parse_spec(route_json)
    assert spec.routing.softmax_in_logits_dtype and "scores-in-logits-dtype" in spec.variant
    _, got_w, got_i = reference.route(x, [ffn.router.layer.weight], spec)
    same = lambda a, b: torch.equal(a.sort(-1).values, b.sort(-1).values)  # noqa: E731  (top-k sets, any order)
    assert same(got_i, want_i.to(got_i.dtype))
    assert torch.equal(got_w.gather(1, got_i.argsort(-1)), want_w.gather(1, want_i.argsort(-1)))
    fp32 = spec.replace(routing=dataclasses.replace(spec.routing, softmax_in_logits_dtype=False))
    _, _, fp32_i = reference.route(x, [ffn.router.layer.weight], fp32)
    assert not same(fp32_i, want_i.to(fp32_i.dtype))


def test_inkling2_softcaps_matter():
    """With caps inside the products' range (the tiny model's own, 4 and 25, barely act on its products), the
    compiled model is still eager's answer, and without the caps eager moves far past the tolerance."""
    model = hf_model("inkling2")
    caps = [m for m in model.modules() if hasattr(m, "softcap")]
    for module in caps:
        module.softcap = 0.5
    ids = random_ids()
    expected, got, _ = eager_and_compiled(model, ids)
    _close(got, expected)
    for module in caps:
        module.softcap = 1e6  # tanh(v / c) c is v here
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) > 1e-2


def test_an_unknown_two_product_activation_is_left_alone(monkeypatch):
    """Inkling-2's gate hands both products to ``act_fn``; the code of the gate says nothing about what ``act_fn``
    does, so another activation class there is left alone (eager's answer, one warning), not read as softcaps."""
    ink = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")

    class ScaledSwiGLU(torch.nn.Module):
        def forward(self, gate, up):
            return torch.nn.functional.silu(gate) * up * 2.0

    model = hf_model("inkling2")
    for module in model.modules():
        if isinstance(module, ink.Inkling2Experts):
            module.act_fn = ScaledSwiGLU()
    with pytest.warns(UserWarning, match="custom gate function"):
        expected, got, report = eager_and_compiled(model, random_ids())
    assert not report.rewritten and report.left_alone, str(report)
    _close(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_inkling2_triton_kernels_bf16_on_gpu():
    """The softcapped GLU in the gate/up epilogue, bf16."""
    assert max(triton_bf16_errors("inkling2", calls=3)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_dbrx_triton_kernels_bf16_on_gpu():
    """DBRX's down weights through a transposed view: the down GEMM's descriptor of the transposed layout."""
    assert max(triton_bf16_errors("dbrx", calls=3)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_mistral4_triton_kernels_bf16_on_gpu():
    """Mistral-4's softmax in bf16, as DBRX's (``RoutingSpec.softmax_in_logits_dtype``), with its groups."""
    assert max(triton_bf16_errors("mistral4", calls=3)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_jetmoe_triton_kernels_bf16_on_gpu():
    """JetMoE's MoE MLPs through the kernels (its mixture of attention heads stays plain ops). This tiny model is
    chaotic in bf16: eager bf16 sits 5e-3 to 7.5e-2 from its fp32 copy, and the reference operator equals eager bf16
    while the kernels, whose products round differently, land 3.5e-3 to 3.9e-2 from it (``benchmarks/bf16_calls.py
    --arch jetmoe``, results/h200/bf16_calls_jetmoe.log). So each call is held to the fp32 model: the kernels may be
    at most 1e-2 further from it than eager bf16 is."""
    import copy

    from dsmoe_compiler.codegen import dispatch

    model = hf_model("jetmoe", None).to("cuda", torch.bfloat16)
    fp32 = copy.deepcopy(model).float()
    dispatch._PLANS.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dualsparse", options={"kernels": "triton", "inner": "eager"})
    generator = torch.Generator("cuda").manual_seed(9)
    for _ in range(3):
        ids = torch.randint(3, VOCAB, (4, 33), device="cuda", generator=generator)
        with torch.no_grad():
            want, eager = fp32(ids).logits, model(ids).logits
            got = compiled(ids).logits
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < rel_err(eager, want) + 1e-2, (rel_err(got, want), rel_err(eager, want))
    assert len(dsmoe_compiler.last_report().rewritten) == 2, str(dsmoe_compiler.last_report())
    assert len(dispatch._PLANS) > 0, "the reference loop ran instead of the kernels"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_longcat_flash_triton_kernels_bf16_on_gpu():
    """Ids of zero-computation experts reach the kernels as given ids outside the routed experts (weight 0 there)."""
    assert max(triton_bf16_errors("longcat_flash", calls=3)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_deepseek_v4_triton_kernels_bf16_on_gpu():
    """Given ids and weights, the clamped GLU in the gate/up epilogue; calls 2 and 3 capture and replay the
    operator's CUDA graph with the next batch's routing copied in."""
    assert max(triton_bf16_errors("deepseek_v4", calls=3)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_nemotron_h_triton_kernels_bf16_on_gpu():
    """Experts without a gate: the gate/up GEMM with one operand and relu squared in its epilogue."""
    assert max(triton_bf16_errors("nemotron_h", calls=3)) < 1e-2
