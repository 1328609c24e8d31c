"""Issue 5: neuron importance profiling, plans, Major/Minor reconstruction (runtime/calibrate.py,
runtime/plan.py, passes/reconstruct.py)."""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch
from conftest import rel_err

import dsmoe_compiler
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.options import Options
from dsmoe_compiler.passes.reconstruct import applied_order, reconstruct_
from dsmoe_compiler.runtime.calibrate import experts_params, experts_spec, find_experts, first_projection
from dsmoe_compiler.runtime.plan import METRICS, LayerPlan, Plan

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2))


def _qwen3():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True))


def _gpt_oss():  # interleaved gate/up, transposed [E, in, out], biases, clamped SwiGLU
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, num_local_experts=8, num_experts_per_tok=2))


def _dbrx():  # experts of its own: 2-D [E I, H] weights, the down projection stored [in, out] (separate layout, views)
    return transformers.DbrxForCausalLM(transformers.DbrxConfig(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}, ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 8,
                                                                         "moe_top_k": 2}))


MODELS = {"olmoe": _olmoe, "qwen3_moe": _qwen3, "gpt_oss": _gpt_oss, "dbrx": _dbrx}


def make(name: str, seed: int):
    """A tiny model with large random expert weights and biases (so that activations, clamps and the
    order of neurons matter), in fp32 eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name]().float().eval()
    with torch.no_grad():
        for _, module, _ in find_experts(model):
            for p in experts_params(module, experts_spec(module)):
                p.normal_(0.0, 0.5)
    return model


_BATCH_SEEDS = itertools.count(1000)  # every call new token ids, the same ones in every run


def batches(n=3, seed=None):
    g = torch.Generator().manual_seed(next(_BATCH_SEEDS) if seed is None else seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def random_plan(model, plan: Plan, seed: int) -> Plan:
    """The plan's fingerprints with random importances: a random permutation per expert."""
    g = torch.Generator().manual_seed(seed)
    layers = {n: LayerPlan(metrics={m: torch.rand(lp.metrics[m].shape, generator=g) for m in METRICS},
                           tokens=lp.tokens, scores=lp.scores, fingerprint=lp.fingerprint)
              for n, lp in plan.layers.items()}
    return Plan(metric="gate", layers=layers, architecture=plan.architecture)


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_in_plan_order(original, model, plan):
    """Sub-expert p of P=2 of the reconstructed model is exactly the plan's p-th half of the original neurons."""
    for (name, mod0, _), (_, mod1, _) in zip(find_experts(original), find_experts(model)):
        order = plan.layers[name].order
        spec = experts_spec(mod0).replace(partition=2)
        p0, p1 = experts_params(mod0, spec.replace(partition=1)), experts_params(mod1, spec)
        I = spec.intermediate
        for e in range(spec.num_experts):
            for half in range(2):
                want = reference.sub_expert_weights(p0, spec.replace(partition=1), e)
                got = reference.sub_expert_weights(p1, spec, 2 * e + half)
                idx = order[e, half * I // 2:(half + 1) * I // 2]
                torch.testing.assert_close(got[0], want[0][idx], rtol=0, atol=0)  # gate rows
                torch.testing.assert_close(got[1], want[1][idx], rtol=0, atol=0)  # up rows
                torch.testing.assert_close(got[2], want[2][:, idx], rtol=0, atol=0)  # down columns
                if want[3] is not None:
                    torch.testing.assert_close(got[3], want[3][idx], rtol=0, atol=0)
                    torch.testing.assert_close(got[4], want[4][idx], rtol=0, atol=0)


# ---- metrics against a direct computation ----------------------------------------------------------
def _direct_metrics(module, name, calls):
    """Per-neuron sums written out from the transformers layout, token by token, in float64."""
    W, b = module.gate_up_proj.double(), getattr(module, "gate_up_proj_bias", None)
    E = W.shape[0]
    if name == "gpt_oss":  # [E, H, 2I] interleaved: gate = even columns, up = odd columns
        gate_w, up_w = W[:, :, 0::2].transpose(1, 2), W[:, :, 1::2].transpose(1, 2)
        gate_b, up_b = b.double()[:, 0::2], b.double()[:, 1::2]
    else:  # [E, 2I, H] concatenated [gate; up]
        I = W.shape[1] // 2
        gate_w, up_w = W[:, :I], W[:, I:]
        gate_b = up_b = torch.zeros(E, I, dtype=torch.float64)
    I = gate_w.shape[1]
    sums = {m: torch.zeros(E, I, dtype=torch.float64) for m in METRICS}
    for hidden, index in calls:
        for t in range(hidden.shape[0]):
            for e in index[t].tolist():
                x = hidden[t].double()
                g, u = gate_w[e] @ x + gate_b[e], up_w[e] @ x + up_b[e]
                if name == "gpt_oss":
                    g = g.clamp(max=7.0)
                    act = g * torch.sigmoid(1.702 * g)
                    gu = act * (u.clamp(-7.0, 7.0) + 1)
                else:
                    act = g * torch.sigmoid(g)  # Swish
                    gu = act * u
                sums["gate"][e] += act
                sums["abs_gate"][e] += act.abs()
                sums["gate_up"][e] += gu
                sums["abs_gate_up"][e] += gu.abs()
    return sums


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss"])
def test_metrics_match_direct_computation(name):
    model = make(name, seed=1)
    layers = find_experts(model)
    layer_name, module, _ = layers[0]
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append((args[0].clone(), args[1].clone())))
    try:
        plan = dsmoe_compiler.calibrate(model, batches(2), progress=False)
    finally:
        handle.remove()
    want = _direct_metrics(module, name, calls)
    lp = plan.layers[layer_name]
    assert int(lp.tokens.sum()) == sum(int(i.numel()) for _, i in calls) > 0
    for m in METRICS:
        assert lp.metrics[m].dtype == torch.float32
        torch.testing.assert_close(lp.metrics[m].double(), want[m], rtol=1e-4, atol=1e-4)
        assert not torch.equal(lp.metrics[m], torch.zeros_like(lp.metrics[m]))
    ordered = lp.metrics["abs_gate"].gather(1, lp.order)  # default metric: descending importance
    assert (ordered.diff(dim=1) <= 0).all() and sorted(lp.order[0].tolist()) == list(range(lp.order.shape[1]))
    # metrics differ from each other (the test would catch a metric computed as another)
    assert not torch.allclose(lp.metrics["gate"], lp.metrics["abs_gate"])
    assert not torch.allclose(lp.metrics["gate_up"], lp.metrics["abs_gate_up"])


def test_scores_sample_and_kwargs_batches():
    model = make("qwen3_moe", seed=2)
    ids = batches(4)
    plan = dsmoe_compiler.calibrate(model, [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids],
                                    metric="abs_gate_up", sample_size=30, progress=False)
    for lp in plan.layers.values():
        assert lp.scores.shape == (30, 2)  # 4 batches x 24 tokens, bounded to 30 rows
        torch.testing.assert_close(lp.scores.sum(-1), torch.ones(30))
        assert int(lp.tokens.sum()) == 4 * 24 * 2
    assert plan.metric == "abs_gate_up"
    assert torch.equal(plan.with_metric("gate").layers["model.layers.0.mlp"].order,
                       torch.sort(plan.layers["model.layers.0.mlp"].metrics["gate"], dim=1, descending=True, stable=True).indices)
    with pytest.raises(ValueError, match="unknown importance metric"):
        dsmoe_compiler.calibrate(model, ids, metric="weight_norm", progress=False)


# ---- reconstruction is exact -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_reconstructed_equals_original_random_permutation(name):
    seed = zlib.crc32(name.encode())
    original = make(name, seed)
    model = copy.deepcopy(original)
    plan = random_plan(model, dsmoe_compiler.calibrate(model, batches(1), progress=False), seed)
    ids = batches(1)[0]
    want = logits(original, ids)
    moved = reconstruct_(model, plan)
    assert moved == sum(lp.num_experts for lp in plan.layers.values())
    assert_same(logits(model, ids), want)
    assert_in_plan_order(original, model, plan)
    # negative control: the same permutation on the gate rows alone (every expert of layer 0) changes the output
    broken = copy.deepcopy(original)
    with torch.no_grad():
        first, module, _ = find_experts(broken)[0]
        spec = experts_spec(module)
        for e, order in enumerate(plan.layers[first].order):
            gate = reference.sub_expert_weights(experts_params(module, spec), spec, e)[0]
            gate.copy_(gate[order].clone())
    assert not torch.allclose(logits(broken, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_reconstructed_equals_original_profiled(name):
    original = make(name, seed=zlib.crc32(name.encode()) + 1)
    model = copy.deepcopy(original)
    plan = dsmoe_compiler.calibrate(model, batches(2), progress=False)
    ids = batches(1)[0]
    want = logits(original, ids)
    reconstruct_(model, plan)
    assert_same(logits(model, ids), want)
    assert_in_plan_order(original, model, plan)
    assert reconstruct_(model, plan) == 0  # applied once: a second application moves nothing
    assert_same(logits(model, ids), want)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_with_plan_equals_eager(name, tmp_path):
    original = make(name, seed=zlib.crc32(name.encode()) + 1)
    model = copy.deepcopy(original)
    plan = dsmoe_compiler.calibrate(model, batches(2), progress=False)
    plan.save(tmp_path / "plan.safetensors")
    ids = batches(1)[0]
    want = logits(original, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dualsparse",
                             options={"inner": "eager", "plan": str(tmp_path / "plan.safetensors")})
    assert_same(logits(compiled, ids), want)
    report = dsmoe_compiler.last_report()
    assert report.counters["reconstruct"] == 2 and report.counters["reconstruct_experts_moved"] == 16
    assert_in_plan_order(original, model, plan)  # the model's own parameters, reordered in place
    assert_same(logits(model, ids), want)  # the uncompiled model is still exact
    for layer, module, _ in find_experts(model):
        assert torch.equal(applied_order(first_projection(module)), plan.layers[layer].order)
    ids2 = batches(1)[0]
    assert_same(logits(compiled, ids2), logits(original, ids2))
    torch._dynamo.reset()


def test_plan_applied_once_and_replanning():
    original = make("olmoe", seed=3)
    ids = batches(1)[0]
    a = dsmoe_compiler.calibrate(original, batches(2), progress=False)
    b = random_plan(original, a, seed=4)
    model = copy.deepcopy(original)
    reconstruct_(model, a)
    reconstruct_(model, b)  # lands on b's order, not on a composition of a and b
    direct = copy.deepcopy(original)
    reconstruct_(direct, b)
    for (_, m1, _), (_, m2, _) in zip(find_experts(model), find_experts(direct)):
        assert torch.equal(m1.gate_up_proj, m2.gate_up_proj) and torch.equal(m1.down_proj, m2.down_proj)
    assert_same(logits(model, ids), logits(original, ids))
    # calibrating the reconstructed model gives the statistics of the original neurons
    cal = batches(2, seed=5)
    p0, p1 = (dsmoe_compiler.calibrate(m, cal, progress=False) for m in (original, model))
    for n in p0.layers:
        for m in METRICS:
            torch.testing.assert_close(p1.layers[n].metrics[m], p0.layers[n].metrics[m], rtol=1e-4, atol=1e-4)


# ---- plan files and checks -----------------------------------------------------------------------------
def test_plan_round_trip(tmp_path):
    model = make("gpt_oss", seed=6)
    plan = dsmoe_compiler.calibrate(model, batches(2), metric="gate_up", progress=False)
    plan.thresholds = {"major": 0.1, "minor": 0.3}
    plan.save(tmp_path / "p.safetensors")
    loaded = dsmoe_compiler.Plan.load(tmp_path / "p.safetensors")
    assert (loaded.metric, loaded.architecture, loaded.thresholds) == ("gate_up", "gpt_oss", plan.thresholds)
    assert loaded.layers.keys() == plan.layers.keys()
    for n, lp in plan.layers.items():
        other = loaded.layers[n]
        assert other.fingerprint == lp.fingerprint
        for a, b in [(lp.order, other.order), (lp.tokens, other.tokens), (lp.scores, other.scores),
                     *((lp.metrics[m], other.metrics[m]) for m in METRICS)]:
            assert a.dtype == b.dtype and torch.equal(a, b)
    loaded.check(model)


def test_plan_mismatch_errors():
    model = make("olmoe", seed=7)
    plan = dsmoe_compiler.calibrate(model, batches(1), progress=False)
    plan.check(model)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp': router weights differ"):
        reconstruct_(make("olmoe", seed=8), plan)  # same shapes, other router weights
    smaller = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="intermediate is 32 in the model but 64 in the plan"):
        plan.check(smaller)
    with pytest.raises(ValueError, match="calibrated on a olmoe, not on a gpt_oss"):
        plan.check(make("gpt_oss", seed=8))
    deeper = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2))
    with pytest.raises(ValueError, match=r"in the model only \['model.layers.2.mlp'\]"):
        plan.check(deeper)
    # through the backend: the pass checks each block against its plan layer
    other = make("olmoe", seed=9)
    torch._dynamo.reset()
    compiled = torch.compile(other, backend="dualsparse", options={"inner": "eager", "plan": plan})
    with pytest.raises(Exception, match="router weights differ"):
        compiled(batches(1)[0])
    torch._dynamo.reset()


def test_plan_from_fp32_fits_the_model_in_bf16_and_fp16(tmp_path):
    """A plan calibrated in fp32 fits the same model cast to bf16 or fp16 (the router fingerprint is taken in bf16),
    after a save/load too, and applying it there still gives the model's own answer; a router changed by more
    than bf16's rounding is still refused."""
    model = make("olmoe", seed=7)
    plan = dsmoe_compiler.calibrate(model, batches(1), progress=False)
    plan.save(tmp_path / "p.safetensors")
    loaded = Plan.load(tmp_path / "p.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        low = make("olmoe", seed=7).to(dtype)
        loaded.check(low)
        ids = batches(1)[0]
        before = low(ids).logits.float()
        reconstruct_(low, loaded)
        after = low(ids).logits.float()  # the neurons' order changes the sums' rounding only
        assert rel_err(after, before) < 1e-2
    moved = make("olmoe", seed=7).to(torch.bfloat16)
    with torch.no_grad():
        router = moved.model.layers[1].mlp.gate.weight
        router[0, 0] = router[0, 0] * 1.5 + 0.1
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp': router weights differ"):
        loaded.check(moved)


def test_corrupted_plan_file_errors(tmp_path):
    plan = dsmoe_compiler.calibrate(make("olmoe", seed=10), batches(1), progress=False)
    path = tmp_path / "p.safetensors"
    plan.save(path)
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the tensor data: safetensors reads it, the checksum does not match
    (tmp_path / "flipped.safetensors").write_bytes(flipped)
    with pytest.raises(ValueError, match="corrupted: checksum mismatch"):
        Plan.load(tmp_path / "flipped.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable plan file"):
        Plan.load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(ValueError, match="not a readable plan file"):
        Plan.load(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no valid dualsparse plan metadata"):
        Plan.load(tmp_path / "other.safetensors")


def test_plan_option():
    plan = dsmoe_compiler.calibrate(make("olmoe", seed=11), batches(1), progress=False)
    assert Options.from_dict({"plan": plan}).partition == 2
    assert Options.from_dict({"plan": plan, "partition": 4}).partition == 4
    assert Options.from_dict({}).partition == 1
    with pytest.raises(ValueError, match="option 'plan' must be a Plan or a path"):
        Options.from_dict({"plan": 3})
