"""Load-aware drop thresholds under expert parallelism (paper §4.3, §5.3.3; reference/paper.md §7).

Every EP rank knows every rank's load at each MoE call: the operator all-gathers the per-sub-expert
pair counts of all ranks' tokens before dropping (``runtime/ep.py``), so
``load_d = #{(token, sub-expert) pairs routed to rank d}`` over the whole group. A threshold policy
turns that into one threshold pair (T_major, T_minor) per *destination* rank: a pair is kept or
dropped with the thresholds of the rank that would compute it, and every rank gets the same answer
because every rank sees the same loads. Dropping then happens before the dispatch, so a dropped pair
costs neither FLOPs nor bytes.

Public hook::

    ThresholdPolicy = Callable[[LoadInfo], torch.Tensor]     # -> [W, 2] fp32 thresholds, on info.loads.device

    dsmoe_compiler.runtime.load_aware.set_policy(literal)            # every EP block
    dsmoe_compiler.runtime.load_aware.set_policy(steep(2.0), layer="model.layers.3.mlp")

The block's own thresholds (``runtime.state``, set by options or ``set_thresholds``) are the maximum
``T_max`` handed to the policy. All policies below run on the device: no host synchronisation.

The paper gives the rule ("ratio r = load / ideal; r >= 1: the maximum threshold; r < 1: reduced
proportionally to the deviation from 1") but no formula. Implemented:

- ``literal``: T = T_max * min(r, 1) (the deviation 1 - r removes the same fraction of T).
- ``steep(alpha)``: T = T_max * clamp(1 - alpha * (1 - r), 0, 1): alpha > 1 reaches T = 0 (no drop)
  at r = 1 - 1/alpha; alpha = 1 is ``literal``.
- ``shift_centre(band)``: 2T only: the centre T_c = (T_major + T_minor) / 2 is scaled as in
  ``literal`` and the band kept (T_c*r - band, T_c*r + band); for 1T it equals ``literal``.
- ``uniform``: T_max everywhere (the baseline: no load awareness).

Neither literal nor steep *guarantees* the paper's "workload at or below that of the originally
most-loaded device": a light rank with r slightly below 1 keeps more pairs than under T_max, and can
then exceed the heaviest rank's post-drop load when T_max drops a large share. ``tests`` and
``benchmarks/ep_straggler.py`` measure it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LoadInfo:
    name: str
    """Block name (module path)."""
    mode: str
    """Drop rule of the block: "1t", "2t", "skip", "topk"."""
    loads: torch.Tensor
    """fp32 [W]: pairs routed to each rank of the EP group at this call, before dropping."""
    thresholds: torch.Tensor
    """fp32 [2]: the block's maximum thresholds (T_major, T_minor); 1T reads T_major."""
    rank: int
    world: int

    @property
    def ideal(self) -> torch.Tensor:
        return self.loads.mean()

    @property
    def ratio(self) -> torch.Tensor:
        """r = load / ideal per rank ([W]; 1 for every rank when nothing is routed)."""
        ideal = self.ideal
        return torch.where(ideal > 0, self.loads / ideal.clamp_min(1e-30), torch.ones_like(self.loads))


ThresholdPolicy = Callable[[LoadInfo], torch.Tensor]


def uniform(info: LoadInfo) -> torch.Tensor:
    return info.thresholds.expand(info.world, 2).clone()


_DEVICE_RULES: "weakref.WeakKeyDictionary[Callable, tuple]" = weakref.WeakKeyDictionary()
"""The built-in policy objects and their (name, alpha, band). Keyed by the object itself, not an attribute: a
user's ``functools.wraps(literal)`` copies a function's attributes, and must not be taken for ``literal``."""
_DEVICE_RULES[uniform] = ("uniform", 0.0, None)


def literal(info: LoadInfo) -> torch.Tensor:
    """T_d = T_max * r_d for r_d < 1, T_max for r_d >= 1 (both thresholds of 2T scaled)."""
    return info.thresholds[None, :] * info.ratio.clamp(max=1.0)[:, None]


_DEVICE_RULES[literal] = ("literal", 0.0, None)


def steep(alpha: float = 2.0) -> ThresholdPolicy:
    """T_d = T_max * clamp(1 - alpha (1 - r_d), 0, 1): no dropping at all below r = 1 - 1/alpha."""

    def policy(info: LoadInfo) -> torch.Tensor:
        factor = (1.0 - alpha * (1.0 - info.ratio)).clamp(0.0, 1.0)
        return info.thresholds[None, :] * factor[:, None]

    policy.__name__ = f"steep({alpha:g})"
    _DEVICE_RULES[policy] = ("steep", float(alpha), None)
    return policy


def shift_centre(band: float | None = None) -> ThresholdPolicy:
    """2T: scale the centre of (T_major, T_minor) by min(r, 1), keep the band (default: the block's own)."""

    def policy(info: LoadInfo) -> torch.Tensor:
        if info.mode != "2t":
            return literal(info)
        t = info.thresholds
        half = (t[1] - t[0]) / 2 if band is None else torch.tensor(band, dtype=t.dtype, device=t.device)
        centre = (t[0] + t[1]) / 2 * info.ratio.clamp(max=1.0)
        return torch.stack([(centre - half).clamp_min(0.0), centre + half], dim=1)

    policy.__name__ = "shift_centre"
    _DEVICE_RULES[policy] = ("shift_centre", 0.0, band)
    return policy


POLICIES: dict[str, ThresholdPolicy] = {"uniform": uniform, "literal": literal, "steep2": steep(2.0),
                                        "shift_centre": shift_centre()}

_POLICY: dict[str | None, ThresholdPolicy] = {}


def set_policy(policy: ThresholdPolicy | str | None, layer: str | None = None) -> None:
    """Use ``policy`` for every EP block (layer=None) or for the blocks named ``layer``; None removes it.

    Takes effect at the next call, no recompile. Without a policy a block drops with its uniform thresholds.
    """
    if isinstance(policy, str):
        policy = POLICIES[policy]
    if policy is None:
        _POLICY.pop(layer, None)
    else:
        _POLICY[layer] = policy


def get_policy(name: str) -> ThresholdPolicy | None:
    return _POLICY.get(name, _POLICY.get(None))


def clear() -> None:
    _POLICY.clear()


def device_rule(policy: ThresholdPolicy) -> tuple | None:
    """(name, alpha, band) of a built-in policy, which ``codegen/load_policy.py`` computes in one launch; None
    for any other callable, a wrapper of a built-in included (it runs as written, on torch tensors)."""
    try:
        return _DEVICE_RULES.get(policy)
    except TypeError:  # not weakly referenceable (e.g. a builtin): not one of ours
        return None


def thresholds_per_rank(policy: ThresholdPolicy | None, info: LoadInfo) -> torch.Tensor:
    """[W, 2] fp32 thresholds of each destination rank (checked shape)."""
    out = uniform(info) if policy is None else policy(info)
    if tuple(out.shape) != (info.world, 2):
        raise ValueError(f"dualsparse: threshold policy returned shape {tuple(out.shape)}, expected ({info.world}, 2)")
    return out.to(torch.float32)
