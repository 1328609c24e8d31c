"""Tiny models for the tests: transformers MoE architectures from configs (no hub) and user-written MoEs."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err

ARCHITECTURES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
IMPLEMENTATIONS = ["grouped_mm", "batched_mm", "eager"]
VOCAB = 96


def _common(**extra):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {**base, **extra}


def hf_config(arch: str):
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**_common(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2))
    if arch == "olmoe":
        return tf.OlmoeConfig(**_common(intermediate_size=48, num_experts=8, num_experts_per_tok=2))
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_common(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                           num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
                                           mlp_only_layers=[]))
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_common(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                           num_experts_per_tok=4, norm_topk_prob=True, head_dim=8, decoder_sparse_step=1,
                                           mlp_only_layers=[]))
    if arch == "deepseek_v2":
        return tf.DeepseekV2Config(**_common(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
                                             num_hidden_layers=3, num_key_value_heads=4, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=16,
                                             q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=8))
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**_common(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                                             num_hidden_layers=3, num_key_value_heads=4, n_group=4, topk_group=2, norm_topk_prob=True,
                                             routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))
    if arch == "gpt_oss":
        return tf.GptOssConfig(**_common(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                         sliding_window=16, layer_types=["sliding_attention", "full_attention"]))
    if arch == "qwen3_5_moe":  # Qwen3's router, always renormalised; linear-attention layers beside full ones
        return tf.Qwen3_5MoeTextConfig(**_common(
            moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
            head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"]))
    if arch == "mistral4":  # softmax scores in groups of experts, the excluded groups set to 0
        return tf.Mistral4Config(**_common(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                           num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=0,
                                           num_key_value_heads=4, n_group=4, topk_group=2, norm_topk_prob=True,
                                           routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=24, head_dim=16,
                                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))
    if arch == "aria":  # top-k of the logits, then softmax over the k (GPT-OSS's rule without a router bias)
        return tf.AriaTextConfig(**_common(intermediate_size=48, moe_num_experts=8, moe_topk=2,
                                           moe_num_shared_experts=1, head_dim=8))
    # routers copied verbatim from a known class under another name (recognised by their code)
    if arch == "glm4_moe":  # DeepSeek-V3's router
        return tf.Glm4MoeConfig(**_common(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                          num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                                          num_hidden_layers=3, n_group=2, topk_group=1, norm_topk_prob=True,
                                          routed_scaling_factor=1.5, head_dim=8))
    if arch == "flex_olmo":  # OLMoE's router
        return tf.FlexOlmoConfig(**_common(intermediate_size=48, num_experts=8, num_experts_per_tok=2))
    if arch == "minimax":  # Mixtral's router
        return tf.MiniMaxConfig(**_common(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                          layer_types=["full_attention", "full_attention"]))
    if arch == "gemma4":  # a router of its own input (a norm of the residual) with a per-expert scale
        return tf.Gemma4TextConfig(**_common(intermediate_size=64, head_dim=8, sliding_window=16,
                                             layer_types=["sliding_attention", "full_attention"], enable_moe_block=True,
                                             num_experts=8, top_k_experts=2, moe_intermediate_size=24,
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB))
    if arch == "phimoe":  # PhiMoE's sparsemixer router (two thresholded softmax rounds)
        return tf.PhimoeConfig(**_common(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                         router_jitter_noise=0.3))
    if arch == "llama4":  # experts of its own, weight on the input (captured as a block: transformers_hf._BLOCKS)
        return tf.Llama4TextConfig(**_common(intermediate_size=24, intermediate_size_mlp=64, num_local_experts=8,
                                             num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=1,
                                             attention_chunk_size=16, no_rope_layers=[1, 1],
                                             layer_types=["chunked_attention", "full_attention"]))
    if arch == "deepseek_v4":  # hash routing, then sqrt-softplus top-k (routing given), a GLU clamped at 0.1
        return tf.DeepseekV4Config(**_common(moe_intermediate_size=24, num_key_value_heads=1, head_dim=16,
                                             q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=8,
                                             n_shared_experts=1, swiglu_limit=0.1, o_groups=2, o_lora_rank=8,
                                             index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=16,
                                             mlp_layer_types=["hash_moe", "moe"],
                                             layer_types=["sliding_attention", "compressed_sparse_attention"]))
    raise ValueError(arch)


OTHER_EXPERTS = ("DbrxExperts", "JetMoeMoE")
"""Experts with no 3-D ``down_proj``: DBRX's 2-D [E I, H] weights in its ``mlp``, JetMoE's two parallel experts."""


def moe_layer_count(model) -> int:
    """Experts modules: a 3-D ``down_proj`` (with ``gate_up_proj``, or ``up_proj`` alone for experts without a gate),
    or one of ``OTHER_EXPERTS``."""
    return sum(1 for m in model.modules() if (isinstance(getattr(m, "down_proj", None), torch.Tensor)
                                              and m.down_proj.dim() == 3) or type(m).__name__ in OTHER_EXPERTS)


SURVEY_BUILT = ("hy_v4", "minimax_m3_vl", "beam", "nemotron_h", "longcat_flash", "doge", "inkling2", "inkling2_loop", "dbrx",
                "jetmoe")
"""Built as ``benchmarks/capture_survey.py`` builds them (its tiny config); skipped where transformers lacks them."""


def hf_model(arch: str, impl: str = "grouped_mm", seed: int = 0):
    import transformers as tf

    if arch in SURVEY_BUILT:
        return _survey_model(arch, impl, seed)
    torch.manual_seed(seed)
    config = hf_config(arch)
    if impl is not None:  # None: the model's default (some versions' models take no other)
        config._experts_implementation = impl
    if arch == "mistral4":  # not in the AutoModelForCausalLM mapping
        return randomize_(tf.Mistral4ForCausalLM(config).eval())
    if arch == "llama4":  # its text model alone (the mapping builds the multimodal one from a text config)
        return randomize_(tf.Llama4ForCausalLM(config).eval())
    model = randomize_(tf.AutoModelForCausalLM.from_config(config).eval())
    for name, table in model.named_buffers():
        if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing: distinct random experts per token id (not all 0)
            table.copy_(torch.rand(table.shape[0], config.n_routed_experts).argsort(dim=-1)[:, : table.shape[1]])
    return model


def _survey_model(arch: str, impl: str | None, seed: int):
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import capture_survey

    model_type = dict(capture_survey.discover()[0]).get(arch)
    if model_type is None:
        pytest.skip(f"{arch} is not in this transformers")
    return capture_survey.build_model(arch, model_type, impl, seed)[0]


def poisoned_empty(shape, dtype, device):
    """NaN in float buffers, -1 in integer ones (for ``dispatch._empty``): any element a kernel forgets to write shows
    up."""
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def random_ids(batch: int = 2, length: int = 13, seed: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def eager_and_compiled(model, ids, options=None):
    """(eager logits, dualsparse logits, report) of one batch, without grad and after a dynamo reset; the non-MoE rest
    runs eagerly unless ``options`` say otherwise."""
    import dsmoe_compiler

    with torch.no_grad():
        expected = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="dualsparse", options=options or {"inner": "eager"})(ids).logits
    return expected, got, dsmoe_compiler.last_report()


def triton_bf16_errors(arch: str, calls: int = 1, seed: int = 9) -> list[float]:
    """GPU only. ``arch``'s random model in bf16, compiled with the Triton kernels, against eager on ``calls`` fresh
    batches (a second call captures each layer's CUDA graph, a third replays it): the relative error of each call's
    logits. Checks that every call is finite, every MoE block was rewritten and the kernels, not the reference loop,
    ran."""
    import dsmoe_compiler
    from dsmoe_compiler.codegen import dispatch

    model = hf_model(arch, None).to("cuda", torch.bfloat16)
    generator = torch.Generator("cuda").manual_seed(seed)
    dispatch._PLANS.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dualsparse", options={"kernels": "triton", "inner": "eager"})
    errors = []
    for _ in range(calls):
        ids = torch.randint(3, VOCAB, (4, 33), device="cuda", generator=generator)
        with torch.no_grad():
            expected = model(ids).logits.double()
            got = compiled(ids).logits.double()
        assert torch.isfinite(got).all()
        errors.append(rel_err(got, expected))
    assert len(dsmoe_compiler.last_report().rewritten) == moe_layer_count(model), str(dsmoe_compiler.last_report())
    assert len(dispatch._PLANS) > 0, "the reference loop ran instead of the kernels"
    print(f"{arch}: ours-vs-eager-bf16 per call {[f'{e:.2e}' for e in errors]}")
    return errors


def randomize_(model):
    """Random, non-degenerate weights everywhere, in place: biases, norms and sinks N(0, 0.1), the rest N(0, 0.2), and
    floating bias buffers that start at zero (DeepSeek-V3's score correction) N(0, 0.1). Also used by
    ``benchmarks/capture_survey.py``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1 if ("bias" in name or "norm" in name or "sinks" in name) else 0.2)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "bias" in name and b.numel() > 0 and not b.any():
                b.normal_(0, 0.1)
    return model


# ---- user-written MoEs -------------------------------------------------------------------------
class SwiGLU(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListMoE(nn.Module):
    """Router + softmax + top-k + a loop over an nn.ModuleList of SwiGLU experts (index_add_ combine)."""

    def __init__(self, hidden=32, inter=48, experts=6, top_k=2, renormalize=True, score="softmax"):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, inter) for _ in range(experts))
        self.top_k, self.renormalize, self.score = top_k, renormalize, score

    def forward(self, x):
        shape = x.shape
        x = x.view(-1, shape[-1])
        logits = self.router(x)
        probs = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view(shape)


class ThreeDMoE(nn.Module):
    """Router + softmax + top-k, experts as 3-D weights gathered per (token, slot) and applied with einsum."""

    def __init__(self, hidden=32, inter=40, experts=6, top_k=3, renormalize=False, weird=False):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, inter, hidden) * 0.2)
        self.w3 = nn.Parameter(torch.randn(experts, inter, hidden) * 0.2)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, inter) * 0.2)
        self.top_k, self.renormalize, self.weird = top_k, renormalize, weird

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weird:  # a routing variant the IR cannot express: squared weights
            weights = weights * weights
        h = F.silu(torch.einsum("th,tkih->tki", x, self.w1[index])) * torch.einsum("th,tkih->tki", x, self.w3[index])
        y = torch.einsum("tki,tkhi->tkh", h, self.w2[index])
        return (y * weights.unsqueeze(-1)).sum(dim=1).reshape(shape)


class UserBlockModel(nn.Module):
    """A small residual stack around a user MoE, so the MoE sits inside a bigger graph."""

    def __init__(self, moe_cls, layers=2, hidden=32, **kw):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(moe_cls(hidden=hidden, **kw) for _ in range(layers))

    def forward(self, x):
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return x


class DenseModel(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.mlp = SwiGLU(hidden, 64)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def relayout(params, spec, layout, transposed=False):
    """The same experts as separate 3-D gate / up / down tensors, or as per-expert 2-D tensors (ModuleList)."""
    E, I = spec.num_experts, spec.intermediate
    router, gate_up, down = params[:3]
    gate, up = gate_up[:, :I].contiguous(), gate_up[:, I:].contiguous()
    if layout == "separate":
        tensors = [gate, up, down]
        if transposed:
            tensors = [t.transpose(1, 2).contiguous() for t in tensors]
        slots = ["gate", "up", "down"]
    elif layout == "dbrx":  # DBRX: gate, up [E, out, in]; down stored [E, in, out], seen through a transposed view
        tensors, slots = [gate, up, down.transpose(1, 2).contiguous().transpose(1, 2)], ["gate", "up", "down"]
        layout = "separate"
    else:
        tensors = [t[e].clone() for e in range(E) for t in (gate, up, down)]
        slots = [f"{role}.{e}" for e in range(E) for role in ("gate", "up", "down")]
    experts = dataclasses.replace(spec.experts, layout=layout, transposed=transposed)
    return [router] + tensors, dataclasses.replace(spec, experts=experts, slots=("router_weight", *slots))
