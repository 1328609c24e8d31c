"""MoE IR: one documented description of a Mixture-of-Experts block.

A recogniser (``dsmoe_compiler/capture``) turns a block found in an FX graph into a ``MoESpec``;
passes (``passes/``) return new specs; ``codegen/reference.py`` defines what a spec computes.
The spec travels inside the graph as the JSON string argument of ``torch.ops.dualsparse.moe``,
next to the flat list of tensors it names in ``slots`` (weights are graph inputs since torch 2.5,
so the op takes them as arguments rather than holding them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

ScoreFunc = Literal["softmax", "sigmoid", "sparsemixer", "given"]
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "gptoss")
ACTIVATION_SLOTS = ("router_input", "topk_index", "topk_weights")
"""Slots that hold a call's activations rather than weights: the router's own input (Gemma-4) and a given routing."""


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """How a token picks its experts and their weights (the torchtitan ``TokenChoiceTopKRouter`` fields)."""

    score_func: ScoreFunc = "softmax"
    """softmax or sigmoid of the router logits; or PhiMoE's sparsemixer (top-2: each round a softmax over the
    logits within jitter_eps of the round's best, its best taken; ``reference.sparsemixer``); or "given": the graph
    computes the routing with ops of its own (a router the other fields cannot express) and the operator takes its
    result, the expert ids and weights [T, K] (slots topk_index, topk_weights), as they are. No other routing field
    applies to "given"."""
    absent_ids: bool = False
    """given only: the graph's ids may name no expert (outside [0, E): LongCat-Flash's zero-computation experts), and
    such a pair is absent, grouped by no kernel and counted by no drop statistic (``reference.present_pairs``).
    Without it such an id (a sentinel that should not occur) is still exact, computed as expert 0 at weight 0, and
    the kernels skip the mask (a few % of a given-routing layer's time on the H200)."""
    jitter_eps: float = 0.0
    """sparsemixer only: logits l with (best - l) / max(|l|, best) > 2 jitter_eps are out of the round's softmax."""
    score_after_topk: bool = False
    """Top-k on raw logits first, then the score function over the k selected logits: a softmax over them (GPT-OSS)
    or the sigmoid of each (Llama-4)."""
    renormalize: bool = False
    """Divide the k selected weights by their sum (Mixtral, Qwen3, DeepSeek-V3 with norm_topk_prob)."""
    renorm_eps: float = 0.0
    """Added to the denominator of the renormalisation (DeepSeek-V3 uses 1e-20)."""
    renorm_min: float = 0.0
    """The denominator is at least this (Ernie-4.5's ``clamp(sum, min=moe_norm_min)``); 0: no clamp."""
    scale: float = 1.0
    """routed_scaling_factor, applied after renormalisation."""
    router_bias: bool = False
    """The router linear has a bias (GPT-OSS)."""
    score_bias: bool = False
    """Per-expert bias added to the scores for selection only (DeepSeek-V3 e_score_correction_bias)."""
    num_groups: int = 1
    """Group-limited routing: experts split in num_groups contiguous groups ..."""
    topk_groups: int = 1
    """... and only the best topk_groups groups may be chosen from."""
    group_score: Literal["max", "top2_sum"] = "max"
    """How a group is scored: max score (DeepSeek-V2) or sum of its two best (DeepSeek-V3)."""
    group_mask_value: Literal["zero", "-inf"] = "zero"
    """What excluded groups' scores become before the final top-k (V2: 0.0, V3: -inf)."""
    logits_fp32: bool = False
    """Router matmul in fp32 (DeepSeek); else in the input dtype."""
    scores_fp32: bool = False
    """Sigmoid of the (input-dtype) logits, or score_after_topk's softmax of the k values, taken in fp32 (MiniMax-M2,
    AFMoE; Granite, Cohere-2); else in the logits' dtype. The softmax over all experts is fp32 unless ..."""
    softmax_in_logits_dtype: bool = False
    """... the model takes it in the logits' dtype (DBRX's ``softmax(logits, dtype=logits.dtype)``, Mistral-4's
    ``logits.softmax(-1)``): its scores rounded there, before the top-k and the weights. In bf16 that rounding makes
    ties, which the routing must break as torch.topk does, so on the GPU such a routing runs as torch ops."""
    weights_fp32: bool = False
    """Top-k weights stay fp32 (Mixtral); else cast back to the input dtype."""
    expert_scale: bool = False
    """The weights times a per-expert tensor at the selected experts, after renormalisation and scale (Gemma-4's
    per_expert_scale; slot expert_scale)."""


@dataclass(frozen=True, kw_only=True)
class ExpertsSpec:
    """Where the expert weights are and what one expert computes."""

    layout: Literal["fused", "separate", "list"] = "fused"
    """fused: 3-D gate_up [E, 2I, H] and down [E, H, I] (slots gate_up, down); separate: 3-D gate, up
    [E, I, H] and down [E, H, I] (slots gate, up, down); list: per-expert 2-D nn.Linear weights
    (slots gate.e, up.e, down.e)."""
    interleaved: bool = False
    """fused only: gate/up rows interleaved (g0, u0, g1, u1, ...) instead of concatenated [gate; up]."""
    transposed: bool = False
    """3-D layouts: weights stored [E, in, out] (GPT-OSS) instead of [E, out, in]."""
    has_bias: bool = False
    """Per-expert biases for gate_up and down."""
    activation: str = "silu"
    """Gate activation of the GLU (silu, gelu, gelu_tanh, relu, relu2 = relu squared); "gptoss" is GPT-OSS's clamped
    (up + 1) * gate * sigmoid(alpha * gate)."""
    alpha: float = 1.702
    limit: float = 7.0
    clamp: Literal["none", "before", "after", "softcap"] = "none"
    """A GLU clamped at ``limit``: "before": the gate to at most limit before the activation (DeepSeek-V4, HY-V4);
    "after": the activation's output to at most limit (Step-3.7); both clamp up to [-limit, limit]. ("gptoss"
    clamps on its own.) "softcap" (Inkling-2, activation silu): the SiLU's linear factor and up bounded smoothly,
    softcap(gate, gate_limit) * sigmoid(gate) * softcap(up, limit), where softcap(v, c) = c tanh(v / c)."""
    gate_limit: float = 0.0
    """softcap only: the cap of the gate's linear factor."""
    glu_fp32: bool = False
    """The GLU computed in fp32 and cast back (Beam); else in the weights' dtype."""
    gated: bool = True
    """False: an expert is down(act(up x)), no gate (NemotronH's relu2 experts); layout "separate" without the gate
    slot (and without biases)."""
    weight_on_input: bool = False
    """Llama-4: a routed expert sees its routing weight times x, and its output is not scaled
    (sum of expert(w x) instead of sum of w expert(x))."""
    expert_offset: int = 0
    """Global index of the first expert the weights hold (a model sharded by ``runtime.dist.shard_experts_``)."""
    local_experts: int = 0
    """Experts the weights hold (experts expert_offset .. expert_offset + local_experts - 1); 0: all of them.
    Non-zero only on a sharded model, which only the expert-parallel operators can run."""


@dataclass(frozen=True, kw_only=True)
class SharedSpec:
    """Always-active shared experts (Qwen2-MoE, DeepSeek), one SwiGLU MLP of intermediate size I_s."""

    intermediate: int
    gated: bool = False
    """Qwen2-MoE: output scaled by sigmoid(x @ w_gate.T)."""
    activation: str = "silu"
    clamp: Literal["none", "before"] = "none"
    """DeepSeek-V4: its gate clamped to at most limit before the activation, its up to [-limit, limit]."""
    limit: float = 7.0


@dataclass(frozen=True, kw_only=True)
class DropSpec:
    """Threshold dropping of (token, sub-expert) pairs; thresholds are run-time tensors (slots)."""

    mode: Literal["none", "1t", "2t", "topk", "skip"] = "none"
    """1t: keep a (token, expert) pair iff its normalised score > T; 2t: on Major/Minor halves (P = 2),
    keep the major half iff score >= T_major and the minor half iff score >= T_minor; baselines:
    topk (static top-(k-1)) and skip (Lu et al.: keep iff score >= T * the token's top score)."""
    key: str = ""
    """Name of this block's run-time state (thresholds, statistics) in ``runtime.state``."""
    shared_outside: int = 0
    """Neurons per token of shared experts computed outside the op (for the compute-weighted drop rate)."""


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    name: str
    """Module path of the block, for reports."""
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    experts: ExpertsSpec = field(default_factory=ExpertsSpec)
    shared: SharedSpec | None = None
    partition: int = 1
    """P: each expert is split into P sub-experts of intermediate/P neurons (views, no copies)."""
    transform: Literal["partial", "complete"] = "partial"
    """partial: indices e*P+p after top-k; complete: router repeated, top-(k*P), W2 (or scores) * P."""
    complete_scale: float = 1.0
    """complete only: factor restoring the output (P for softmax or renormalised routing, 1 for plain sigmoid)."""
    drop: DropSpec = field(default_factory=DropSpec)
    slots: tuple[str, ...] = ()
    """Names of the tensors passed to the op, in order (router_weight, gate_up, down, w1.0, ...)."""

    # ---- derived -------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """Short routing description for reports."""
        r = self.routing
        parts = [r.score_func + ("(topk logits)" if r.score_after_topk else "")]
        if r.absent_ids:
            parts.append("absent-ids")
        if r.renormalize:
            parts.append("renorm")
        if r.softmax_in_logits_dtype:
            parts.append("scores-in-logits-dtype")
        if r.scale != 1.0:
            parts.append(f"scale={r.scale:g}")
        if r.score_bias:
            parts.append("score-bias")
        if r.expert_scale:
            parts.append("expert-scale")
        if "router_input" in self.slots:
            parts.append("own-router-input")
        if r.num_groups > 1:
            parts.append(f"groups={r.num_groups}/{r.topk_groups}({r.group_score})")
        if self.shared is not None:
            clamped = self.shared.clamp != "none"
            parts.append("shared" + ("+gate" if self.shared.gated else "") + ("+clamp" if clamped else ""))
        if self.experts.activation == "gptoss":
            parts.append("clamped-swiglu")
        elif self.experts.clamp != "none":
            parts.append(f"{self.experts.activation}-glu-clamped-{self.experts.clamp}")
        if not self.experts.gated:
            parts.append(f"{self.experts.activation}-no-gate")
        if self.experts.weight_on_input:
            parts.append("weight-on-input")
        if self.partition > 1:
            parts.append(f"P={self.partition}({self.transform})")
        if self.drop.mode != "none":
            parts.append(f"drop={self.drop.mode}")
        return " ".join(parts)

    def slot(self, name: str) -> int:
        return self.slots.index(name)

    def replace(self, **changes) -> "MoESpec":
        return dataclasses.replace(self, **changes)

    # ---- serialisation (the op's string argument) ----------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "MoESpec":
        return _spec_from_json(text)


def _spec_from_json(text: str) -> MoESpec:
    d = json.loads(text)
    d["routing"] = RoutingSpec(**d["routing"])
    d["experts"] = ExpertsSpec(**d["experts"])
    d["shared"] = SharedSpec(**d["shared"]) if d["shared"] is not None else None
    d["drop"] = DropSpec(**d["drop"])
    d["slots"] = tuple(d["slots"])
    return MoESpec(**d)
