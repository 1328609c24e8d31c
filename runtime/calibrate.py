"""Neuron importance profiling (paper §4.2(b), §5.3.4): run a model on calibration batches, return a Plan.

    plan = dsmoe_compiler.calibrate(model, batches, metric="abs_gate")

The model runs eagerly under ``torch.no_grad`` (and in eval mode, restored afterwards) with a forward
pre-hook on every transformers experts module (a module with ``gate_up_proj``, or ``up_proj`` alone for experts
without a gate, and ``down_proj`` that ``capture.transformers_hf.describe_experts`` can describe; without a gate all
four metrics below read act(x·W_up)), or with experts of their own (``transformers_hf.EXPERT_TENSORS``: DBRX's, and
JetMoE's whole block, whose hook routes the block's input itself: ``transformers_hf.BLOCK_ROUTING``). Each hook sees
the experts' inputs (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) and, for every expert e and the tokens
routed to it, accumulates in fp32 per neuron

    gate        Σ act(x·W1)            (Eq. 14; act = the model's gate activation, Swish for SwiGLU)
    abs_gate    Σ |act(x·W1)|          (Eq. 15)
    gate_up     Σ glu(x·W1, x·W3)      (Eq. 16; glu = act(x·W1) ⊙ (x·W3), GPT-OSS's clamped variant)
    abs_gate_up Σ |glu(x·W1, x·W3)|    (Eq. 17)

with biases where the model has them, reading W1/W3 through ``reference.sub_expert_weights`` so that
every layout (concatenated or interleaved, transposed or not) is read the way the model reads it.
All four are kept; ``metric`` only picks which one orders the neurons (``plan.with_metric`` switches).
Each hook also keeps a bounded uniform sample of the normalised top-k scores (weights / their sum)
and per-expert token counts, for threshold calibration.

Tokens are not weighted by their gating score (the paper's formulas show no weighting). Calibrating a
model whose experts were already reconstructed gives the same plan as calibrating the original: the
statistics are mapped back to the original neuron indices (``passes/reconstruct.py`` records the
order it applied on the parameters).

Limits: only transformers experts modules are profiled (user-written ModuleList or 3-D-weight MoE
blocks are not hooked yet); the per-expert loop synchronises with the host, which is fine for
calibration and never happens in the compiled forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import ExpertsSpec, MoESpec
from dsmoe_compiler.runtime.plan import METRICS, LayerPlan, Plan
from dsmoe_compiler.runtime.plan import layer_fingerprint as plan_fingerprint


# ---- finding the MoE layers -------------------------------------------------------------------------
def unwrap(model):
    """The eager module behind a ``torch.compile``d one."""
    return getattr(model, "_orig_mod", model)


def model_architecture(model) -> str:
    model = unwrap(model)
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _router_of(parent, experts_module):
    from dsmoe_compiler.capture.transformers_hf import ROUTERS

    children = [c for c in parent.children() if c is not experts_module]
    for child in children:
        if type(child).__name__ in ROUTERS:
            return child
    for name in ("gate", "router"):
        child = getattr(parent, name, None)
        # Gemma-4's router keeps its linear as .proj, DBRX's as .layer
        for holder in (child, getattr(child, "proj", None), getattr(child, "layer", None)):
            if isinstance(getattr(holder, "weight", None), torch.Tensor):
                return holder
    return None


def find_experts(model):
    """[(layer name, experts module, router module or None)] for every describable transformers experts module.

    The layer name is the experts module's parent path ("model.layers.0.mlp"), the name the backend
    gives the fused MoE block.
    """
    from dsmoe_compiler.capture.transformers_hf import BLOCK_ROUTING, describe_experts

    model = unwrap(model)
    modules = dict(model.named_modules())
    found = []
    for path, module in modules.items():
        if first_projection(module) is None or "down" not in expert_tensors(module):
            continue
        if not isinstance(describe_experts(module), ExpertsSpec):
            continue
        if type(module).__name__ in BLOCK_ROUTING:  # the block itself (JetMoE): its router is its own child
            found.append((path, module, _router_of(module, module)))
            continue
        parent_path = path.rpartition(".")[0]
        found.append((parent_path or path, module, _router_of(modules[parent_path], module)))
    return found


def expert_tensors(module) -> dict[str, torch.Tensor]:
    """An experts module's weights by operator slot: transformers' ``gate_up_proj`` / ``up_proj`` / ``down_proj`` (and
    biases), or the views of a class with weights of its own (``transformers_hf.EXPERT_TENSORS``: DBRX)."""
    from dsmoe_compiler.capture.transformers_hf import EXPERT_TENSORS

    own = EXPERT_TENSORS.get(type(module).__name__)
    if own is not None:
        return own(module)
    found = {slot: getattr(module, attribute, None) for slot, attribute in _ATTRIBUTES.items()}
    return {slot: t for slot, t in found.items() if isinstance(t, torch.Tensor)}


def first_projection(module) -> torch.Tensor | None:
    """An experts module's 3-D first weight: gate_up_proj, up_proj when it has no gate (NemotronH), DBRX's gate view;
    None otherwise."""
    tensors = expert_tensors(module)
    w = tensors.get("gate_up" if getattr(module, "has_gate", True) else "up", tensors.get("gate"))
    return w if isinstance(w, torch.Tensor) and w.dim() == 3 else None


def experts_spec(module, name: str = "experts") -> MoESpec:
    """A partition-1 MoESpec of a transformers experts module, slots gate_up, down[, biases] (no gate: up, down)."""
    from dsmoe_compiler.capture.transformers_hf import describe_experts

    ex = describe_experts(module)
    shape = first_projection(module).shape
    hidden, inter = (shape[1], shape[2]) if ex.transposed else (shape[2], shape[1])
    slots = ("gate", "up", "down") if ex.layout == "separate" and ex.gated else (
        ("gate_up", "down") if ex.gated else ("up", "down"))
    slots += ("gate_up_bias", "down_bias") if ex.has_bias else ()
    one_per_neuron = ex.layout == "separate" or not ex.gated  # else gate_up holds two rows per neuron
    # the routed experts: LongCat-Flash's gate_up_proj also holds (unused) rows for its zero-computation experts
    return MoESpec(name=name, num_experts=expert_tensors(module)["down"].shape[0], top_k=1, hidden=hidden,
                   intermediate=inter if one_per_neuron else inter // 2, experts=ex, slots=slots)


def experts_params(module, spec: MoESpec) -> list[torch.Tensor]:
    tensors = expert_tensors(module)
    return [tensors[s] for s in spec.slots]


_ATTRIBUTES = {"gate_up": "gate_up_proj", "up": "up_proj", "down": "down_proj", "gate_up_bias": "gate_up_proj_bias",
               "down_bias": "down_proj_bias"}
"""Slot name -> the transformers experts module's attribute."""


def layer_fingerprint(module, router) -> dict:
    return plan_fingerprint(experts_spec(module), None if router is None else router.weight)


# ---- the statistics -----------------------------------------------------------------------------------
def gate_activation(gate: torch.Tensor, ex: ExpertsSpec) -> torch.Tensor:
    """act(x·W1) as the model computes it inside its GLU (GPT-OSS: clamp then gate * sigmoid(alpha * gate))."""
    if ex.activation == "gptoss":
        gate = gate.clamp(max=ex.limit)
        return gate * torch.sigmoid(gate * ex.alpha)
    if ex.clamp == "softcap":
        return reference.softcap(gate, ex.gate_limit) * torch.sigmoid(gate)
    act = reference.ACT[ex.activation](gate.clamp(max=ex.limit) if ex.clamp == "before" else gate)
    return act.clamp(max=ex.limit) if ex.clamp == "after" else act


def neuron_statistics(x: torch.Tensor, params, spec: MoESpec, expert: int) -> dict[str, torch.Tensor]:
    """The four metrics of one expert over the rows of x (tokens routed to it), each [I] fp32."""
    gate, up, _, gb, ub, _ = reference.sub_expert_weights(params, spec, expert)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    x = x.float()
    u = F.linear(x, f32(up), f32(ub))
    ex = spec.experts
    if ex.gated:
        g = F.linear(x, f32(gate), f32(gb))
        act, gu = gate_activation(g, ex), reference.expert_glu(g, u, ex)
    else:  # one product: its activation is both the "gate" and the whole expert's hidden value
        act = gu = reference.expert_glu(None, u, ex)
    return {"gate": act.sum(0), "abs_gate": act.abs().sum(0), "gate_up": gu.sum(0), "abs_gate_up": gu.abs().sum(0)}


class _LayerStats:
    def __init__(self, name, module, router, sample_size: int, generator: torch.Generator):
        self.name, self.module, self.router = name, module, router
        self.spec = experts_spec(module, name)
        E, I = self.spec.num_experts, self.spec.intermediate
        device = first_projection(module).device
        self.sums = {m: torch.zeros(E, I, dtype=torch.float32, device=device) for m in METRICS}
        self.tokens = torch.zeros(E, dtype=torch.int64, device=device)
        self.sample_size, self.generator = sample_size, generator
        self.scores = torch.zeros(0, 0)
        self.keys = torch.zeros(0)

    def update(self, hidden, index, weights) -> None:
        x = hidden.reshape(-1, self.spec.hidden)
        index = index.reshape(x.shape[0], -1)
        weights = weights.reshape(x.shape[0], -1)
        params = experts_params(self.module, self.spec)
        self.tokens += torch.bincount(index.flatten(), minlength=self.spec.num_experts)[: self.spec.num_experts]
        for e in torch.unique(index).tolist():  # NOTE: host sync per layer call; calibration only
            if not 0 <= e < self.spec.num_experts:  # expert-parallel sentinels
                continue
            token, _ = torch.where(index == e)
            for m, v in neuron_statistics(x[token], params, self.spec, e).items():
                self.sums[m][e] += v
        self._sample(weights, (index >= 0) & (index < self.spec.num_experts))

    def _sample(self, weights, present) -> None:
        """Reservoir by random keys: keep the sample_size rows with the largest keys seen so far (uniform). A pair
        on no expert (LongCat-Flash's zero-computation experts) is absent, as the operator sees it: NaN, and the
        others normalised among themselves (``reference.present_pairs``, ``thresholds.routed_drop_fraction``)."""
        w = torch.where(present, weights.detach().float(), 0.0).cpu()
        s = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        s = torch.where(present.cpu(), s, float("nan"))
        keys = torch.rand(s.shape[0], generator=self.generator)
        if self.scores.numel():
            s, keys = torch.cat([self.scores, s]), torch.cat([self.keys, keys])
        if s.shape[0] > self.sample_size:
            keep = torch.topk(keys, self.sample_size).indices
            s, keys = s[keep], keys[keep]
        self.scores, self.keys = s, keys

    def result(self) -> LayerPlan:
        from dsmoe_compiler.passes.reconstruct import applied_order

        metrics = {m: v.cpu() for m, v in self.sums.items()}
        current = applied_order(first_projection(self.module))
        if current is not None:  # statistics of position j belong to original neuron current[e, j]
            metrics = {m: torch.zeros_like(v).scatter_(1, current.cpu(), v) for m, v in metrics.items()}
        scores = self.scores if self.scores.numel() else torch.zeros(0, 1)
        return LayerPlan(metrics=metrics, tokens=self.tokens.cpu(), scores=scores,
                         fingerprint=layer_fingerprint(self.module, self.router))


def _hook(stats: _LayerStats):
    from dsmoe_compiler.capture.transformers_hf import BLOCK_ROUTING

    block_routing = BLOCK_ROUTING.get(type(stats.module).__name__)

    def pre_hook(module, args, kwargs):
        with torch.no_grad():
            if block_routing is not None:  # a whole block (JetMoE): route its input as the operator does
                stats.update(*block_routing(module, args, kwargs))
                return
            names = ("hidden_states", "top_k_index", "top_k_weights")
            stats.update(*(list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]))

    return pre_hook


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def calibrate(model, batches: Iterable, metric: str = "abs_gate", *, sample_size: int = 65536,
              seed: int = 0, progress: bool = True) -> Plan:
    """Profile neuron importance on ``batches`` (input-id tensors or model keyword dicts) and return a Plan.

    ``metric`` orders the neurons ("abs_gate" is the paper's choice for Mixtral and OLMoE,
    "abs_gate_up" for DeepSeek-V2-Lite); all four metrics are stored in the plan. ``sample_size``
    bounds the per-layer sample of normalised top-k scores.
    """
    from tqdm.auto import tqdm

    if metric not in METRICS:
        raise ValueError(f"dualsparse: unknown importance metric {metric!r}; choose one of {METRICS}")
    model = unwrap(model)
    layers = find_experts(model)
    if not layers:
        raise ValueError("dualsparse: calibrate found no transformers experts module it can describe in the model")
    generator = torch.Generator().manual_seed(seed)
    stats = [_LayerStats(name, module, router, sample_size, generator) for name, module, router in layers]
    device = first_projection(layers[0][1]).device
    was_training = model.training
    with contextlib.ExitStack() as stack:
        for s in stats:
            stack.callback(s.module.register_forward_pre_hook(_hook(s), with_kwargs=True).remove)
        stack.callback(model.train, was_training)
        model.eval()
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="dualsparse calibrate", disable=not progress):
                batch = _to(batch, device)
                model(**batch) if isinstance(batch, dict) else model(batch)
    return Plan(metric=metric, layers={s.name: s.result() for s in stats}, architecture=model_architecture(model))
