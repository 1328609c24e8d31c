"""A calibration plan: per-layer neuron orders for Major/Minor reconstruction, and what produced them.

A ``Plan`` is what ``dsmoe_compiler.calibrate`` returns and what ``passes/reconstruct.py`` applies.
Per MoE layer (keyed by the block's module path, e.g. ``"model.layers.0.mlp"``, the ``name`` the
backend gives the block) it holds:

- ``metrics[m]``: [E, I] fp32 neuron importance for each of the four metrics of the paper (§4.2(b)),
  accumulated over the calibration tokens routed to each expert;
- ``order``: [E, I] int64, each row the expert's neurons by descending importance under
  ``plan.metric``. Position j of row e is the neuron that reconstruction moves to slot j, so the
  first I/P neurons form sub-expert p=0 (Major for P=2), the next I/P sub-expert p=1, ... (P > 2
  gives P importance tiers);
- ``tokens``: [E] how many calibration (token, expert) pairs each expert received;
- ``scores``: [N, k] fp32 a bounded uniform sample of the normalised top-k scores s̃ (each token's
  top-k weights divided by their sum), for the threshold calibration of the drop passes;
- ``thresholds``: reserved for the drop passes (a JSON dict, empty until they fill it).

Neuron indices always refer to the model's *original* neuron order (the checkpoint's), whatever
reconstruction was applied when calibrating, so a plan can be applied to a fresh copy of the model.

Files: ``plan.save(path)`` writes one safetensors file; its metadata holds a JSON document with the
metric, the thresholds, a fingerprint of the model (architecture, per-layer shapes and layout, a
sketch of each router weight that survives a cast between fp32, bf16 and fp16: ``router_sketch``) and a
SHA-256 of every tensor, so that ``Plan.load`` detects a corrupted or truncated file and
``plan.check(model)`` names any mismatch with a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

METRICS = ("abs_gate", "gate", "gate_up", "abs_gate_up")
"""The paper's four importance metrics (Eq. 14-17): Σ|Swish(xW1)|, ΣSwish(xW1), ΣSwish(xW1)⊙xW3, Σ|..⊙..|."""

FORMAT = "dualsparse-plan/2"  # 2: the router's fingerprint is a sketch (``router_sketch``), not a hash


@dataclass
class LayerPlan:
    """Calibration results of one MoE layer."""

    metrics: dict[str, torch.Tensor]
    """metric name -> [E, I] fp32 accumulated importance (original neuron indexing)."""
    tokens: torch.Tensor
    """[E] int64: calibration (token, expert) pairs per expert."""
    scores: torch.Tensor
    """[N, k] fp32: sample of normalised top-k scores."""
    fingerprint: dict
    """num_experts, intermediate, hidden, layout flags, router_sketch of the layer's model block."""
    order: torch.Tensor | None = None
    """[E, I] int64 neuron order under the plan's metric (filled by ``Plan``)."""

    @property
    def num_experts(self) -> int:
        return self.fingerprint["num_experts"]

    @property
    def intermediate(self) -> int:
        return self.fingerprint["intermediate"]


def neuron_order(importance: torch.Tensor) -> torch.Tensor:
    """[E, I] importance -> [E, I] int64 neuron indices by descending importance (ties: lower index first)."""
    return torch.sort(importance, dim=-1, descending=True, stable=True).indices


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


SKETCH = 4
"""The router sketch is SKETCH x SKETCH numbers per layer."""
ROUTER_RTOL = 1e-2
"""Largest relative distance between two router sketches that still counts as the same router."""


def router_sketch(weight: torch.Tensor | None) -> list[float] | None:
    """The router's fingerprint: A W B for fixed random A [SKETCH, E], B [H, SKETCH], in fp64 (16 numbers). The same
    router in fp32, bf16 or fp16 gives sketches within a fraction of a percent (each weight's rounding error
    averages out over E H terms of random sign), so a plan calibrated in fp32 fits the model served in bf16; two
    different routers are as far apart as the sketches' own size. A hash of the weights could not do this: the
    same fp32 router cast to fp16 and to bf16 differs in ~6 % of its bf16 bits (double rounding)."""
    if weight is None:
        return None
    w = weight.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(0x5eed)
    a = torch.randn(SKETCH, w.shape[0], generator=g, dtype=torch.float64)
    b = torch.randn(w.shape[1], SKETCH, generator=g, dtype=torch.float64)
    return [float(f"{v:.9g}") for v in (a @ w @ b).flatten().tolist()]


def sketch_distance(a: list[float], b: list[float]) -> float:
    """||a - b|| / ||b|| of two router sketches (inf when their sizes differ)."""
    if len(a) != len(b):
        return float("inf")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((ta - tb).norm() / tb.norm().clamp_min(1e-300)).item()


def layer_fingerprint(spec, router_weight: torch.Tensor | None) -> dict:
    """What a plan layer must match in the model: sizes, weight layout, activation and the router."""
    ex = spec.experts
    return {"num_experts": spec.num_experts, "intermediate": spec.intermediate, "hidden": spec.hidden,
            "interleaved": ex.interleaved, "transposed": ex.transposed, "has_bias": ex.has_bias,
            "activation": ex.activation, "router_sketch": router_sketch(router_weight)}


@dataclass
class Plan:
    metric: str
    layers: dict[str, LayerPlan]
    architecture: str
    thresholds: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"dualsparse: unknown importance metric {self.metric!r}; choose one of {METRICS}")
        for layer in self.layers.values():
            layer.order = neuron_order(layer.metrics[self.metric])

    # ---- derived plans ---------------------------------------------------------------------------
    def with_metric(self, metric: str) -> "Plan":
        """The same calibration, with neuron orders from another of the four metrics."""
        layers = {n: dataclasses.replace(lp, order=None) for n, lp in self.layers.items()}
        return Plan(metric=metric, layers=layers, architecture=self.architecture, thresholds=dict(self.thresholds))

    def layer(self, name: str) -> tuple[str, LayerPlan] | None:
        """The plan layer for a block path; also matches when one path is a dotted suffix of the other
        (a submodule compiled on its own sees ``layers.0.mlp`` for ``model.layers.0.mlp``)."""
        if name in self.layers:
            return name, self.layers[name]
        hits = [n for n in self.layers if n.endswith("." + name) or name.endswith("." + n)]
        return (hits[0], self.layers[hits[0]]) if len(hits) == 1 else None

    # ---- model checks ----------------------------------------------------------------------------
    def check(self, model) -> None:
        """Raise ValueError naming the first difference between this plan's model and ``model``."""
        from dsmoe_compiler.runtime.calibrate import find_experts, layer_fingerprint, model_architecture

        arch = model_architecture(model)
        if arch != self.architecture:
            raise ValueError(f"dualsparse: plan was calibrated on a {self.architecture}, not on a {arch}")
        found = {name: layer_fingerprint(module, router) for name, module, router in find_experts(model)}
        matched = {name: self.layer(name) for name in found}
        missing = sorted(set(self.layers) - {hit[0] for hit in matched.values() if hit is not None})
        extra = sorted(name for name, hit in matched.items() if hit is None)
        if missing or extra:
            raise ValueError(f"dualsparse: plan layers do not match the model's MoE layers: "
                             f"in the plan only {missing[:3]}, in the model only {extra[:3]}")
        for name, fp in found.items():
            check_layer_fingerprint(name, matched[name][1].fingerprint, fp)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, lp in self.layers.items():
            for m, t in lp.metrics.items():
                tensors[f"{name}/metric.{m}"] = t.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{name}/tokens"] = lp.tokens.detach().to("cpu", torch.int64).contiguous()
            tensors[f"{name}/scores"] = lp.scores.detach().to("cpu", torch.float32).contiguous()
        header = {
            "format": FORMAT,
            "metric": self.metric,
            "architecture": self.architecture,
            "thresholds": self.thresholds,
            "layers": {name: lp.fingerprint for name, lp in self.layers.items()},
            "sha256": {k: tensor_sha256(t) for k, t in tensors.items()},
        }
        save_file(tensors, os.fspath(path), metadata={"dualsparse_plan": json.dumps(header, sort_keys=True)})

    @staticmethod
    def load(path: str | os.PathLike) -> "Plan":
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers and truncation
            raise ValueError(f"dualsparse: {path} is not a readable plan file (corrupted or not safetensors): "
                             f"{exc}") from exc
        try:
            header = json.loads(meta["dualsparse_plan"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"dualsparse: {path} has no valid dualsparse plan metadata") from exc
        if header.get("format") != FORMAT:
            raise ValueError(f"dualsparse: {path} has plan format {header.get('format')!r}, expected {FORMAT!r}")
        expected = header["sha256"]
        if set(expected) != set(tensors):
            raise ValueError(f"dualsparse: {path} is corrupted: tensors {sorted(set(expected) ^ set(tensors))[:3]} "
                             f"missing or unexpected")
        for key, t in tensors.items():
            if tensor_sha256(t) != expected[key]:
                raise ValueError(f"dualsparse: {path} is corrupted: checksum mismatch in tensor {key!r}")
        layers = {}
        for name, fp in header["layers"].items():
            layers[name] = LayerPlan(metrics={m: tensors[f"{name}/metric.{m}"] for m in METRICS},
                                     tokens=tensors[f"{name}/tokens"], scores=tensors[f"{name}/scores"],
                                     fingerprint=fp)
        return Plan(metric=header["metric"], layers=layers, architecture=header["architecture"],
                    thresholds=header["thresholds"])

    def __repr__(self) -> str:
        n = sum(int(lp.tokens.sum()) for lp in self.layers.values())
        return (f"Plan(metric={self.metric!r}, architecture={self.architecture!r}, layers={len(self.layers)}, "
                f"routed pairs={n})")


def check_layer_fingerprint(name: str, planned: dict, actual: dict) -> None:
    for key in sorted(set(planned) | set(actual)):
        mine, theirs = planned.get(key), actual.get(key)
        if key == "router_sketch" and mine is not None and theirs is not None:
            distance = sketch_distance(theirs, mine)
            if distance > ROUTER_RTOL:
                raise ValueError(f"dualsparse: plan does not fit layer {name!r}: router weights differ (their sketches "
                                 f"are {distance:.3g} apart relative, more than {ROUTER_RTOL:g})")
        elif mine != theirs:
            raise ValueError(f"dualsparse: plan does not fit layer {name!r}: "
                             f"{key} is {theirs!r} in the model but {mine!r} in the plan")


_CACHE: dict[tuple, Plan] = {}


def resolve_plan(plan: "Plan | str | os.PathLike") -> Plan:
    """A Plan, or a path loaded once per (path, mtime, size)."""
    if isinstance(plan, Plan):
        return plan
    path = os.path.abspath(os.fspath(plan))
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = Plan.load(path)
    return _CACHE[key]
