"""Expert partition (passes/partition.py): the partitioned MoE operator equals the original.

Hypothesis draws whole blocks (specs and fresh random weights), the ``ci`` profile of conftest.py
runs 200 derandomised examples per property.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsmoe_compiler
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec, SharedSpec
from dsmoe_compiler.passes import PASSES
from dsmoe_compiler.passes.partition import derive_complete_scale, partition_spec, reverse_partial

ACTIVATIONS = ["silu", "gelu", "gelu_tanh", "relu", "gptoss"]


# ---- random blocks ------------------------------------------------------------------------------
FAMILIES = ["sigmoid+renorm", "softmax+renorm", "sigmoid", "softmax", "softmax after top-k"]


@st.composite
def blocks(draw, family=None):
    """(spec with partition 1, P) for a random block: routing (of the given family), experts, shared experts."""
    P = draw(st.integers(1, 4))
    family = family or draw(st.sampled_from(FAMILIES))
    after_topk = family == "softmax after top-k"
    score_func = family.split("+")[0].split()[0]
    grouping = "none" if after_topk else draw(st.sampled_from(["top2_sum", "max", "none"]))
    if grouping == "none":
        E, groups, topk_groups, group_score, mask = draw(st.integers(1, 8)), 1, 1, "max", "zero"
    else:  # DeepSeek group-limited routing: E = groups * group size, the best topk_groups groups
        groups = draw(st.integers(2, 4))
        E = groups * draw(st.integers(2 if grouping == "top2_sum" else 1, 3))
        topk_groups, group_score = draw(st.integers(1, groups)), grouping
        mask = draw(st.sampled_from(["-inf", "zero"]))
    allowed = topk_groups * (E // groups)  # experts left after group masking: top-k never reaches masked ones
    routing = RoutingSpec(
        score_func=score_func, score_after_topk=after_topk,
        renormalize=family.endswith("+renorm"), renorm_eps=draw(st.sampled_from([0.3, 0.0, 1e-20])),
        scale=draw(st.sampled_from([1.0, 2.5])),
        router_bias=draw(st.booleans()), score_bias=not after_topk and draw(st.booleans()),
        num_groups=groups, topk_groups=topk_groups, group_score=group_score, group_mask_value=mask,
        logits_fp32=draw(st.booleans()), weights_fp32=draw(st.booleans()))
    layout = draw(st.sampled_from(["fused", "separate", "list"]))  # transformers' 3-D, a user's 3-D or ModuleList
    experts = ExpertsSpec(layout=layout, interleaved=layout == "fused" and draw(st.booleans()),
                          transposed=layout != "list" and draw(st.booleans()),
                          has_bias=draw(st.booleans()), activation=draw(st.sampled_from(ACTIVATIONS)))
    shared = None
    if draw(st.booleans()):
        shared = SharedSpec(intermediate=draw(st.integers(1, 4)), gated=draw(st.booleans()),
                            activation=draw(st.sampled_from(["silu", "gelu"])))
    spec = MoESpec(name=f"block{draw(st.integers(0, 9))}", num_experts=E, top_k=draw(st.integers(1, allowed)),
                   hidden=draw(st.integers(1, 6)), intermediate=P * draw(st.integers(1, 3)),
                   routing=routing, experts=experts, shared=shared)
    return spec.replace(slots=slots_of(spec)), P


def slots_of(spec: MoESpec) -> tuple[str, ...]:
    slots = ["router_weight"]
    slots += ["router_bias"] if spec.routing.router_bias else []
    slots += ["score_bias"] if spec.routing.score_bias else []
    ex = spec.experts
    if ex.layout == "fused":
        slots += ["gate_up", "down"] + (["gate_up_bias", "down_bias"] if ex.has_bias else [])
    else:
        roles = ["gate", "up", "down"] + (["gate_bias", "up_bias", "down_bias"] if ex.has_bias else [])
        slots += roles if ex.layout == "separate" else [f"{r}.{e}" for e in range(spec.num_experts) for r in roles]
    if spec.shared is not None:
        slots += ["shared_gate", "shared_up", "shared_down"] + (["shared_gate_weight"] if spec.shared.gated else [])
    return tuple(slots)


def random_params(spec: MoESpec, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    E, H, I = spec.num_experts, spec.hidden, spec.intermediate
    Is = spec.shared.intermediate if spec.shared is not None else 0
    transposed = spec.experts.transposed
    shapes = {"router_weight": (E, H), "router_bias": (E,), "score_bias": (E,),
              "gate_up": (E, H, 2 * I) if transposed else (E, 2 * I, H),
              "down": (E, I, H) if transposed else (E, H, I),
              "gate_up_bias": (E, 2 * I), "down_bias": (E, H),
              "shared_gate": (Is, H), "shared_up": (Is, H), "shared_down": (H, Is), "shared_gate_weight": (1, H)}
    # separate 3-D gate / up / down (optionally [E, in, out]) and a ModuleList's per-expert nn.Linear weights
    expert = {"gate": (I, H), "up": (I, H), "down": (H, I), "gate_bias": (I,), "up_bias": (I,), "down_bias": (H,)}
    for role, shape in expert.items():
        shapes[role] = (E, *shape[::-1]) if transposed and "bias" not in role else (E, *shape)
        shapes.update({f"{role}.{e}": shape for e in range(E)})
    params = [torch.randn(shapes[name], generator=g, dtype=dtype) for name in spec.slots]
    r = spec.routing
    if r.score_bias:  # zero-filled groups must stay below every allowed choice, or zeros tie at the k-th place
        b = params[spec.slot("score_bias")]  # as large as the scores: it changes the selection
        if r.num_groups > 1 and r.group_mask_value == "zero":
            b.abs_()
    return params


def check_equal(spec: MoESpec, P: int, transform: str, seed: int, tokens: int, dtype: torch.dtype) -> None:
    params = random_params(spec, seed, dtype)
    x = torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    want = reference.moe(x, params, spec)
    got = reference.moe(x, params, partition_spec(spec, P, transform))
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item() if tokens else 1))


draws = dict(seed=st.integers(0, 2**31), tokens=st.sampled_from([0, 1, 2, 5, 16]),
             dtype=st.sampled_from([torch.float32, torch.float64]))


# ---- the properties -----------------------------------------------------------------------------
@given(block=blocks(), **draws)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_partial_equals_original(block, seed, tokens, dtype):
    """Partial acts after top-k, whatever the routing: one property over all routing families."""
    spec, P = block
    check_equal(spec, P, "partial", seed, tokens, dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_complete_equals_original(family):
    """Complete changes the router: 200 examples per routing family (each has its own derived scale)."""

    @given(block=blocks(family), **draws)
    @settings(suppress_health_check=[HealthCheck.too_slow])
    def prop(block, seed, tokens, dtype):
        spec, P = block
        check_equal(spec, P, "complete", seed, tokens, dtype)

    prop()


@given(block=blocks())
def test_reverse_partial_restores_ir(block):
    spec, P = block
    transformed = partition_spec(spec, P, "partial")
    assert transformed.partition == P
    restored = reverse_partial(transformed)
    assert restored == spec
    assert restored.to_json() == spec.to_json()
    assert MoESpec.from_json(transformed.to_json()) == transformed


def test_reverse_partial_refuses_complete():
    spec = MoESpec(name="b", num_experts=4, top_k=2, hidden=4, intermediate=4, slots=("router_weight",))
    with pytest.raises(ValueError, match="partial"):
        reverse_partial(partition_spec(spec, 2, "complete"))


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_scale_derivation(P):
    """The sympy-derived (scale, eps factor) per routing, and each one checked on concrete numbers."""
    assert derive_complete_scale("softmax", False, False, P) == (P, 1.0)
    assert derive_complete_scale("softmax", True, False, P) == (P, 1.0)
    assert derive_complete_scale("sigmoid", False, False, P) == (1.0, 1.0)
    assert derive_complete_scale("sigmoid", True, False, P) == (P, P)
    assert derive_complete_scale("softmax", False, True, P) == (P, 1.0)
    # numeric check of the sigmoid + renormalisation case, with a large eps where it matters
    s, eps = torch.rand(5, dtype=torch.float64) + 0.1, 0.3
    original = s[0] / (s[:3].sum() + eps)
    copy = s[0] / (P * s[:3].sum() + P * eps)
    assert torch.allclose(P * copy, original, rtol=1e-12)


def test_partition_must_divide_intermediate():
    spec = MoESpec(name="model.layers.3.mlp", num_experts=4, top_k=2, hidden=4, intermediate=6)
    with pytest.raises(ValueError, match=r"'partition'=4 .*intermediate size 6 .*model\.layers\.3\.mlp"):
        partition_spec(spec, 4, "partial")


def test_ties_partial_exact():
    """A degenerate router (all logits equal, every expert tied): partial is still exact."""
    spec = MoESpec(name="b", num_experts=6, top_k=2, hidden=5, intermediate=8,
                   routing=RoutingSpec(renormalize=True))
    spec = spec.replace(slots=slots_of(spec))
    params = random_params(spec, seed=7, dtype=torch.float32)
    params[0].zero_()
    x = torch.randn(9, 5)
    torch.testing.assert_close(reference.moe(x, params, partition_spec(spec, 4, "partial")),
                               reference.moe(x, params, spec), rtol=1e-5, atol=1e-6)


# ---- transformers models -------------------------------------------------------------------------
def _common(**extra):
    return dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def tiny_model(arch: str, hidden: int = 32, inter: int = 48, seed: int = 0):
    import transformers as tf

    common = _common()
    common["hidden_size"] = hidden
    configs = {
        "olmoe": lambda: tf.OlmoeConfig(**common, intermediate_size=inter, num_experts=8, num_experts_per_tok=2),
        "mixtral": lambda: tf.MixtralConfig(**common, intermediate_size=inter, num_local_experts=8,
                                            num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=inter,
                                               num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, head_dim=8,
                                               decoder_sparse_step=1, mlp_only_layers=[]),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=inter,
                                                   n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                                                   first_k_dense_replace=0, n_group=4, topk_group=2,
                                                   norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=16,
                                                   q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                   v_head_dim=8),
        "gpt_oss": lambda: tf.GptOssConfig(**common, intermediate_size=inter, num_local_experts=8,
                                           num_experts_per_tok=2, head_dim=8, sliding_window=16,
                                           layer_types=["full_attention"]),
    }
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(configs[arch]()).eval()
    with torch.no_grad():  # non-degenerate weights (score correction biases start at zero)
        for name, p in model.named_parameters():
            p.normal_(0, 0.1 if ("bias" in name or "norm" in name) else 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    return model


def compiled(model, **options):
    return torch.compile(model, backend="dualsparse", options={"inner": "eager", **options})


@pytest.mark.parametrize("transform", ["partial", "complete"])
@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_transformers_models(arch, P, transform):
    model = tiny_model(arch)
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        want = model(ids).logits.float()
        got = compiled(model, partition=P, transform=transform)(ids).logits.float()
    report = dsmoe_compiler.last_report()
    assert report.counters["partition"] == 1 and len(report.rewritten) == 1, str(report)
    assert f"P={P}({transform})" in report.rewritten[0].variant
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_indivisible_partition_names_block_and_option():
    model = tiny_model("olmoe", inter=48)
    ids = torch.randint(3, 64, (1, 4))
    with torch.no_grad(), pytest.raises(Exception, match=r"'partition'=5 .*48 .*model\.layers\.0\.mlp"):
        compiled(model, partition=5)(ids)


# ---- no extra weight memory ----------------------------------------------------------------------
def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("transform", ["partial", "complete"])
def test_sub_experts_share_storage_with_parameters(transform, monkeypatch):
    """Every sub-expert view the compiled forward reads lies in the storage of a model parameter."""
    model = tiny_model("olmoe")
    parameters = {_storage(p): name for name, p in model.named_parameters()}
    seen = []

    def recording(module, name):  # the reference loop's views of one sub-expert, the grouped path's of one neuron group
        original = getattr(module, name)

        def record(params, spec, sub):
            views = original(params, spec, sub)
            seen.append((spec.partition, sub, [v for v in views if v is not None]))
            return views

        monkeypatch.setattr(module, name, record)

    recording(reference, "sub_expert_weights")
    recording(reference, "neuron_group_weights")
    with torch.no_grad():
        compiled(model, partition=4, transform=transform)(torch.randint(3, 64, (2, 6)))
    assert seen and all(P == 4 for P, _, _ in seen)
    for _, sub, views in seen:
        names = {parameters.get(_storage(v)) for v in views}
        assert None not in names, f"sub-expert {sub} reads a tensor that is not a model parameter"
        assert names == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}


def _peak_bytes(fn) -> int:
    """Peak of live CPU bytes allocated while fn runs (torch profiler memory events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_memory_before_after_partition(capsys):
    """Parameter bytes unchanged and no weight-sized allocation in the forward with P=4 (numbers printed)."""
    model = tiny_model("olmoe", hidden=128, inter=512)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
    param_bytes = lambda: sum(p.untyped_storage().nbytes() for p in model.parameters())  # noqa: E731
    before = param_bytes()
    ids = torch.randint(3, 64, (1, 8))
    lines = [f"expert weights {expert_bytes} B, all parameters {before} B"]
    with torch.no_grad():
        eager = _peak_bytes(lambda: model(ids))
        lines.append(f"eager forward peak {eager} B")
        for transform in ("partial", "complete"):
            torch._dynamo.reset()
            fn = compiled(model, partition=4, transform=transform)
            compiling = _peak_bytes(lambda: fn(ids))
            peak = _peak_bytes(lambda: fn(ids))
            lines.append(f"compiling P=4 {transform} (first call) peak {compiling} B")
            lines.append(f"compiled P=4 {transform} forward peak {peak} B")
            assert peak < expert_bytes / 4, lines
    assert param_bytes() == before
    lines.append(f"parameters after compile {param_bytes()} B")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ---- graph dump -----------------------------------------------------------------------------------
def test_dump_shows_before_and_after(tmp_path):
    model = tiny_model("mixtral")
    with torch.no_grad():
        compiled(model, partition=2, transform="complete", dump_dir=str(tmp_path))(torch.randint(3, 64, (1, 5)))
    files = sorted(os.listdir(tmp_path))
    before = [f for f in files if f.endswith("_after_capture.txt")]
    after = [f for f in files if f.endswith("_after_partition.txt")]
    assert before and after, files
    before_text, after_text = (tmp_path / before[0]).read_text(), (tmp_path / after[0]).read_text()
    assert '"partition": 1' in before_text and '"partition": 2' not in before_text
    assert '"partition": 2' in after_text and '"transform": "complete"' in after_text
    assert '"complete_scale": 2.0' in after_text  # Mixtral: softmax + renormalisation
    assert "partition" in dict(PASSES)
