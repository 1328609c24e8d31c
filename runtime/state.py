"""Run-time state of compiled MoE blocks: drop thresholds and drop statistics, kept on the device.

The ``dualsparse.moe`` operator looks its block's state up by ``spec.drop.key`` on every call, so
changing a threshold (``set_thresholds``) takes effect at the next call without recompiling, and a
CUDA graph that captured the operator reads the new value from the same memory. Statistics are
accumulated on the device inside the operator; only ``drop_stats()`` reads them back (one host
synchronisation, when the user asks).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class BlockState:
    name: str
    thresholds: torch.Tensor
    """fp32 [2]: (T_major, T_minor); 1T-Drop uses T_major."""
    stats: torch.Tensor | None
    """fp64 [2]: (dropped routed neurons, routed + shared neurons), or None when stats are off."""


_STATES: dict[str, BlockState] = {}
_ids = itertools.count()


def register(name: str, t_major: float, t_minor: float, device, stats: bool) -> str:
    key = f"{name}#{next(_ids)}"
    _STATES[key] = BlockState(
        name=name,
        thresholds=torch.tensor([t_major, t_minor], dtype=torch.float32, device=device),
        stats=torch.zeros(2, dtype=torch.float64, device=device) if stats else None,
    )
    return key


def lookup(key: str) -> BlockState | None:
    return _STATES.get(key)


def blocks(name: str | None = None) -> list[BlockState]:
    return [s for s in _STATES.values() if name is None or s.name == name]


def set_thresholds(threshold: float | None = None, *, t_major: float | None = None, t_minor: float | None = None,
                   band: float = 0.01, layer: str | None = None) -> None:
    """Change the drop thresholds of every compiled block (or of the blocks named ``layer``), in place.

    ``threshold`` alone sets (T - band, T + band) for 2T-Drop and T for 1T-Drop (whose rule reads T_major,
    so 1T blocks get T itself: pass band=0 to keep both equal).
    """
    if threshold is not None:
        t_major, t_minor = threshold - band, threshold + band
    if t_major is None or t_minor is None:
        raise ValueError("set_thresholds: give threshold, or both t_major and t_minor")
    for state in blocks(layer):
        state.thresholds.copy_(torch.tensor([t_major, t_minor]))


def set_block_thresholds(thresholds: dict[str, tuple[float, float]]) -> None:
    """Per-layer thresholds: {block name: (T_major, T_minor)}."""
    for name, (t_major, t_minor) in thresholds.items():
        for state in blocks(name):
            state.thresholds.copy_(torch.tensor([t_major, t_minor]))


def drop_stats() -> dict[str, dict[str, float]]:
    """Compute-weighted drop rate per block name and overall since the last ``reset_drop_stats()``."""
    per_name: dict[str, list[float]] = {}
    for state in _STATES.values():
        if state.stats is None:
            continue
        dropped, total = state.stats.tolist()
        acc = per_name.setdefault(state.name, [0.0, 0.0])
        acc[0] += dropped
        acc[1] += total
    out = {name: {"dropped": d, "total": t, "drop_rate": d / t if t else 0.0} for name, (d, t) in per_name.items()}
    d, t = sum(v["dropped"] for v in out.values()), sum(v["total"] for v in out.values())
    out["overall"] = {"dropped": d, "total": t, "drop_rate": d / t if t else 0.0}
    return out


def reset_drop_stats() -> None:
    for state in _STATES.values():
        if state.stats is not None:
            state.stats.zero_()


def clear() -> None:
    """Forget every block (``torch._dynamo.reset()`` does this through the backend's reset)."""
    _STATES.clear()
