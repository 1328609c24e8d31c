"""What the MoE operator computes: the one semantics every kernel, pass and EP path is tested against.

Readable plain torch, in the spirit of torchtitan's ``_run_experts_for_loop``: a loop over
(sub-)experts, kept for comparison and readability. Sub-expert ``s`` of a block with partition P is
neuron group ``s % P`` of expert ``s // P`` and is read as a strided view of the original weights,
never a copy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsmoe_compiler.ir import MoESpec


@functools.lru_cache(maxsize=None)
def parse_spec(spec_json: str) -> MoESpec:
    return MoESpec.from_json(spec_json)


def _param(spec: MoESpec, params, name: str):
    return params[spec.slots.index(name)] if name in spec.slots else None


# ---- routing -------------------------------------------------------------------------------------
def router_logits(x: torch.Tensor, params, spec: MoESpec) -> torch.Tensor:
    """The router GEMM, on x or, where the block has one (Gemma-4: a norm of the residual), its own input."""
    if "router_input" in spec.slots:
        x = _param(spec, params, "router_input").reshape(-1, spec.hidden)
    weight, bias = _param(spec, params, "router_weight"), _param(spec, params, "router_bias")
    if spec.routing.logits_fp32:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x, weight, bias)


def _group_mask(choice: torch.Tensor, spec: MoESpec, copies: int) -> torch.Tensor:
    """Boolean [T, E'] mask of the experts in the best topk_groups groups (DeepSeek group-limited routing)."""
    r = spec.routing
    grouped = choice.view(choice.shape[0], r.num_groups, choice.shape[1] // r.num_groups)  # explicit: T may be 0
    if r.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # sum of the two best distinct experts; with P equal copies each, the 2P best sum to P times it
        group_scores = grouped.topk(2 * copies, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, k=r.topk_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)


def route(x: torch.Tensor, params, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router: returns (logits [T, E'], weights [T, K'], sub-expert indices [T, K'])."""
    r = spec.routing
    if r.score_func == "given":  # computed by the graph: no logits here (an empty [T, 0])
        weights, index = (_param(spec, params, n).reshape(-1, spec.top_k) for n in ("topk_weights", "topk_index"))
        # an id outside the experts (a "no expert" sentinel; LongCat-Flash's zero-computation experts) adds nothing,
        # as transformers' loops skip it: an absent pair (``present_pairs``), expert 0 at weight 0 here, so that no
        # kernel indexes past the experts
        inside = (index >= 0) & (index < spec.num_experts)
        return x.new_empty(x.shape[0], 0), torch.where(inside, weights, 0), torch.where(inside, index, 0)
    logits = router_logits(x, params, spec)
    copies = spec.partition if spec.transform == "complete" else 1
    k = spec.top_k * copies
    if copies > 1:  # complete transformation: router rows repeated P times, expert e -> e*P .. e*P+P-1
        logits = logits.repeat_interleave(copies, dim=-1)
    if r.score_func == "sparsemixer":
        weights, index = sparsemixer(logits, r.jitter_eps)
    elif r.score_after_topk:
        values, index = torch.topk(logits, k, dim=-1)
        if r.score_func == "softmax":
            weights = torch.softmax(values, dim=-1, dtype=torch.float32 if r.scores_fp32 else values.dtype)
        else:  # Llama-4: the sigmoid of each selected logit
            weights = (values.float() if r.scores_fp32 else values).sigmoid()
    else:
        softmax_dtype = logits.dtype if r.softmax_in_logits_dtype else torch.promote_types(logits.dtype, torch.float32)
        scores = (torch.softmax(logits, dim=-1, dtype=softmax_dtype)
                  if r.score_func == "softmax" else (logits.float() if r.scores_fp32 else logits).sigmoid())
        choice = scores
        if r.score_bias:
            bias = _param(spec, params, "score_bias").repeat_interleave(copies)
            if copies > 1 and r.score_func == "softmax":  # copy scores are s/P: bias/P keeps (s + b)/P in order
                bias = bias / copies
            choice = scores + bias
        if r.num_groups > 1:
            fill = 0.0 if r.group_mask_value == "zero" else float("-inf")
            choice = choice.masked_fill(~_group_mask(choice, spec, copies), fill)
        index = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(1, index)
        if r.renormalize:
            denominator = weights.sum(dim=-1, keepdim=True) + r.renorm_eps
            weights = weights / (denominator.clamp_min(r.renorm_min) if r.renorm_min else denominator)
        weights = weights * r.scale
    if r.expert_scale:
        weights = weights * _param(spec, params, "expert_scale").repeat_interleave(copies)[index]
    if copies > 1:
        weights = weights * spec.complete_scale
    if not r.weights_fp32:
        weights = weights.to(x.dtype)
    return logits, weights, index


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's routing at inference (transformers' ``sparsemixer`` with training off), op for op: two rounds, each
    picking the best remaining logit and weighting it by a softmax over the logits near it; (weights, index) [T, 2]."""
    weights, index, scores = [], [], logits
    for _ in range(2):
        best_value, best = scores.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=best_value)
        far = ((best_value - logits) / factor) > (2 * jitter_eps)
        weights.append(torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(dim=-1, index=best))
        index.append(best)
        scores = torch.scatter(logits, -1, best, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(index, dim=-1)


def partial_transform(index: torch.Tensor, weights: torch.Tensor, partition: int):
    """Paper Eq. 12: [i1, .., iK] -> [i1*P, .., iK*P, i1*P+1, .., iK*P+P-1]; weights tiled P times."""
    if partition == 1:
        return index, weights
    offsets = torch.arange(partition, device=index.device).repeat_interleave(index.shape[-1])
    return index.repeat(1, partition) * partition + offsets, weights.repeat(1, partition)


# ---- experts -------------------------------------------------------------------------------------
def expert_tensor(params, spec: MoESpec, name: str):
    """Expert tensor ``name`` over the block's E experts: [E, out, in] for a weight (a transposed view where it is
    stored [E, in, out]), [E, out] for a bias; None where the block has none. Sliced to E only where the tensor holds
    more experts (LongCat-Flash's gate/up rows for its zero-computation experts, which no pair reaches): even a
    slice of the whole tensor costs its backward a zero-filled copy."""
    t = _param(spec, params, name)
    if t is None:
        return None
    t = t if t.shape[0] == spec.num_experts else t[:spec.num_experts]
    return t.transpose(1, 2) if t.dim() == 3 and spec.experts.transposed else t


def gate_up_slices(spec: MoESpec, lo: int, hi: int) -> tuple[slice, slice]:
    """Rows of neurons lo..hi-1's gate and of their up in a fused gate/up weight: alternating where interleaved
    (g, u, g, u, ...), else all gate rows then all up rows."""
    if spec.experts.interleaved:
        return slice(2 * lo, 2 * hi, 2), slice(2 * lo + 1, 2 * hi, 2)
    return slice(lo, hi), slice(spec.intermediate + lo, spec.intermediate + hi)


def neuron_group_weights(params, spec: MoESpec, p: int):
    """(gate, up, down, gate_bias, up_bias, down_bias) of neuron group p (neurons p c .. (p + 1) c - 1) of every
    expert, for 3-D expert tensors (layouts "fused" and "separate"): [E, c, H], [E, c, H] and [E, H, c] views (gate
    None without a gate), [E, c] biases, and the down bias [E, H] with p == 0 only (the Major half carries the
    whole expert's)."""
    c = spec.intermediate // spec.partition
    lo, hi = p * c, (p + 1) * c
    tensor = functools.partial(expert_tensor, params, spec)
    if spec.experts.layout == "separate":
        gate, up, gate_bias, up_bias = tensor("gate"), tensor("up"), tensor("gate_bias"), tensor("up_bias")
        g_rows = u_rows = slice(lo, hi)
    else:
        gate = up = tensor("gate_up")
        gate_bias = up_bias = tensor("gate_up_bias")
        g_rows, u_rows = gate_up_slices(spec, lo, hi)
    rows = lambda t, sl: None if t is None else t[:, sl]  # noqa: E731
    down_bias = tensor("down_bias") if p == 0 else None
    return (rows(gate, g_rows), rows(up, u_rows), tensor("down")[:, :, lo:hi], rows(gate_bias, g_rows),
            rows(up_bias, u_rows), down_bias)


def sub_expert_weights(params, spec: MoESpec, sub: int):
    """(gate [c, H], up [c, H], down [H, c], gate_bias, up_bias, down_bias) views of sub-expert `sub`."""
    e, p = divmod(sub, spec.partition)
    if spec.experts.layout != "list":
        return tuple(None if t is None else t[e] for t in neuron_group_weights(params, spec, p))
    c = spec.intermediate // spec.partition
    lo, hi = p * c, (p + 1) * c
    gate, up, down, gb, ub, db = (_param(spec, params, f"{n}.{e}")  # no gate: None (ExpertsSpec.gated)
                                  for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"))
    cut = lambda b: None if b is None else b[lo:hi]  # noqa: E731
    # The down bias belongs to the whole expert: sub-expert p == 0 (the Major half) carries it.
    return cut(gate), up[lo:hi], down[:, lo:hi], cut(gb), cut(ub), (db if p == 0 else None)


ACT = {"silu": F.silu, "relu": F.relu, "relu2": lambda t: torch.square(F.relu(t)), "gelu": F.gelu,
       "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
"""The activations an expert may use, by ``ExpertsSpec.activation`` name."""


def softcap(v: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(v / cap) * cap


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0,
        clamp: str = "none", in_fp32: bool = False, gate_limit: float = 0.0):
    """The experts' GLU (``ExpertsSpec.activation``, ``clamp``, ``glu_fp32``, ``gate_limit``)."""
    if in_fp32:
        return glu(gate.float(), up.float(), activation, alpha, limit, clamp, gate_limit=gate_limit).to(gate.dtype)
    if clamp == "softcap":  # Inkling-2: the sigmoid sees the raw gate
        return softcap(gate, gate_limit) * torch.sigmoid(gate) * softcap(up, limit)
    if activation == "gptoss":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    act = ACT[activation]
    if clamp == "none":
        return act(gate) * up
    up = up.clamp(min=-limit, max=limit)
    return (act(gate.clamp(max=limit)) if clamp == "before" else act(gate).clamp(max=limit)) * up


def expert_glu(gate: torch.Tensor, up: torch.Tensor, ex) -> torch.Tensor:
    """``glu`` as the ExpertsSpec ``ex`` describes it; without a gate (``gated`` False, ``gate`` None), act(up)."""
    if not ex.gated:
        return ACT[ex.activation](up)
    return glu(gate, up, ex.activation, ex.alpha, ex.limit, ex.clamp, ex.glu_fp32, ex.gate_limit)


def sorted_pairs(index: torch.Tensor, keep: torch.Tensor | None, subs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat pair ids ordered by sub-expert, stable, dropped pairs last; kept pairs per sub-expert [subs])."""
    flat = index.flatten().long()  # ids may come as floats (given routing in a test's fp64 copy of the params)
    flat = flat if keep is None else flat.masked_fill(~keep.flatten(), subs)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=subs + 1)[:subs]


def pairs_by_sub_expert(index: torch.Tensor, keep: torch.Tensor | None, subs: int):
    """(sub-expert, (tokens, slots)) of the kept pairs of every sub-expert that has any, each in (token, slot) order
    (what ``torch.where(index == sub)`` gives), from one stable sort and one host read of the counts, not one host
    synchronisation per sub-expert (the loop runs again under autograd in ``gradients.py``'s backward)."""
    order, counts = sorted_pairs(index, keep, subs)
    start = 0
    for sub, count in enumerate(counts.tolist()):
        if count:
            chosen = order[start:start + count]
            yield sub, (chosen // index.shape[1], chosen % index.shape[1])
        start += count


def experts(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, params, spec: MoESpec,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts: sum over kept (token, slot) pairs of weight * sub_expert(x) (weight_on_input:
    sub_expert(weight * x)). index holds sub-expert ids."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    ex = spec.experts
    for sub, (token, slot) in pairs_by_sub_expert(index, keep, spec.num_experts * spec.partition):
        gate, up, down, gb, ub, db = sub_expert_weights(params, spec, sub)
        xs, w = x[token], weights[token, slot, None]
        if ex.weight_on_input:
            xs = (xs * w).to(xs.dtype)
        h = expert_glu(None if gate is None else F.linear(xs, gate, gb), F.linear(xs, up, ub), ex)
        y = F.linear(h, down, db)
        out.index_add_(0, token, (y if ex.weight_on_input else y * w).to(out.dtype))
    return out.to(x.dtype)


def shared_experts(x: torch.Tensor, params, spec: MoESpec) -> torch.Tensor:
    s = spec.shared
    gate, up, down = (_param(spec, params, f"shared_{n}") for n in ("gate", "up", "down"))
    y = F.linear(glu(F.linear(x, gate), F.linear(x, up), s.activation, limit=s.limit, clamp=s.clamp), down)
    if s.gated:
        y = torch.sigmoid(F.linear(x, _param(spec, params, "shared_gate_weight"))) * y
    return y


# ---- dropping --------------------------------------------------------------------------------------
def normalized_scores(weights: torch.Tensor) -> torch.Tensor:
    """Paper §3.2: the selected weights divided by their sum (identity up to the scale for routers that
    already renormalise, so one rule serves every router)."""
    w = weights.float()
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def present_pairs(params, spec: MoESpec) -> torch.Tensor | None:
    """[T, K'] mask of the pairs that run an expert, in the slot order the experts see; None where all do. Only a
    given routing can name no expert (an id outside [0, E)): such a pair is absent, computed by no kernel and counted
    neither kept nor dropped by the drop statistics."""
    if spec.routing.score_func != "given" or not spec.routing.absent_ids:
        return None
    index = _param(spec, params, "topk_index").reshape(-1, spec.top_k)
    return per_column((index >= 0) & (index < spec.num_experts), spec)


def per_column(mask: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """A [T, K] pair mask in the slot order the experts see: partial transformation: each pair's P columns."""
    return mask.repeat(1, spec.partition) if spec.transform == "partial" else mask


def with_present(keep: torch.Tensor | None, present: torch.Tensor | None) -> torch.Tensor | None:
    if present is None:
        return keep
    return present if keep is None else keep & present


def keep_mask(weights: torch.Tensor, spec: MoESpec, thresholds: torch.Tensor) -> torch.Tensor:
    """Kept (token, slot) pairs, [T, K'] in the slot order the experts see (partial: Eq. 12 order).

    ``thresholds`` is a 2-element fp32 tensor (T_major, T_minor); single-threshold rules use T_major.
    The comparison runs on the device: no host synchronisation. Rules (s = normalised score):
    1t keep iff s > T; 2t major half iff s >= T_major, minor half iff s >= T_minor; baselines:
    "topk" static top-(k-1) (the lowest-weight pair of every token goes), "skip" Lu et al.'s expert
    skipping generalised to top-k (keep iff s >= T * max s of the token).
    """
    score = normalized_scores(weights)
    mode = spec.drop.mode
    if mode == "2t":
        major, minor = score >= thresholds[0], score >= thresholds[1]  # sub-expert 0 Major, 1 Minor
        return torch.cat([major, minor], dim=1)
    if mode == "1t":
        keep = score > thresholds[0]
    elif mode == "skip":
        keep = score >= thresholds[0] * score.max(dim=-1, keepdim=True).values
    else:  # "topk": drop each token's lowest-weight pair
        keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, score.argmin(dim=-1, keepdim=True), False)
    return per_column(keep, spec)


def routed_units(spec: MoESpec) -> int:
    """Neurons one token runs through in routed experts without dropping (the drop rate's unit)."""
    return spec.top_k * spec.intermediate


def shared_units(spec: MoESpec) -> int:
    """Neurons one token runs through in shared experts: folded into the operator, or beside it in the graph."""
    return spec.drop.shared_outside + (spec.shared.intermediate if spec.shared is not None else 0)


def record_drops(stats: torch.Tensor, keep: torch.Tensor, spec: MoESpec, present: torch.Tensor | None = None) -> None:
    """stats[0] += dropped routed neurons, stats[1] += routed + shared neurons (compute-weighted, on device); absent
    pairs (``present_pairs``) are neither."""
    per_slot = spec.intermediate * spec.top_k / keep.shape[1]
    shared = shared_units(spec)
    if present is None:
        stats[0].add_((~keep).sum() * per_slot)
        stats[1].add_(keep.shape[0] * (routed_units(spec) + shared))
    else:
        stats[0].add_((~keep & present).sum() * per_slot)
        stats[1].add_(present.sum() * per_slot + keep.shape[0] * shared)


# ---- the whole block -----------------------------------------------------------------------------
def moe(x: torch.Tensor, params, spec: MoESpec, thresholds: torch.Tensor | None = None,
        stats: torch.Tensor | None = None, keep: torch.Tensor | None = None, routed=None) -> torch.Tensor:
    """The MoE block on x [T, H]: route, drop, (partial transform), experts, shared experts.

    ``keep`` [T, K'] overrides the drop rule with a given mask of kept (token, slot) pairs. ``routed`` replaces
    ``experts`` with a function of the same arguments and result (the batched one of the backward).
    """
    _, weights, index = route(x, params, spec)
    if keep is None and spec.drop.mode != "none":
        keep = keep_mask(weights, spec, thresholds)
    present = present_pairs(params, spec)
    keep = with_present(keep, present)
    if spec.transform == "partial":
        index, weights = partial_transform(index, weights, spec.partition)
    if stats is not None and keep is not None:
        record_drops(stats, keep, spec, present)
    out = (routed or experts)(x, index, weights, params, spec, keep)
    if spec.shared is not None:
        out = out + shared_experts(x, params, spec)
    return out
