"""Thresholds for a target compute-weighted drop rate, fitted to calibration score samples.

The paper picks thresholds by sweeps and measures the rate; it observes that the rate is not linear
in the threshold and differs across layers (§5.3.3). Here the rate of a threshold on one layer is
read off that layer's sample of normalised top-k scores, and bisection finds the threshold for a
target, either one global T for all layers (the paper's setting; layers then drop at different
rates) or one T per layer giving every layer the same rate (the "equal rate per layer" policy for
the paper's open question 1).
"""

from __future__ import annotations

import torch


def routed_drop_fraction(scores: torch.Tensor, mode: str, t_major: float, t_minor: float) -> float:
    """Fraction of routed compute dropped on a sample of normalised scores [N, k] (a half counts half); NaN marks an
    absent pair (no expert: no compute), counted in neither."""
    present = ~scores.isnan()
    if not present.any():
        return 0.0

    def share(dropped):
        return ((dropped & present).sum() / present.sum()).item()

    if mode == "1t":
        return share(scores <= t_major)
    if mode == "skip":
        return share(scores < t_major * scores.nan_to_num(float("-inf")).max(dim=-1, keepdim=True).values)
    return 0.5 * (share(scores < t_major) + share(scores < t_minor))


def _thresholds(t: float, mode: str, band: float) -> tuple[float, float]:
    return (max(t - band, 0.0), t + band) if mode == "2t" else (t, t)


def _bisect(rate_of, target: float, iterations: int = 60) -> float:
    low, high = 0.0, 1.0 + 1e-6
    for _ in range(iterations):
        mid = (low + high) / 2
        if rate_of(mid) < target:
            low = mid
        else:
            high = mid
    return high


def fit_thresholds(layers: dict[str, tuple[torch.Tensor, float]], target: float, mode: str, band: float = 0.01,
                   policy: str = "global") -> dict[str, tuple[float, float]]:
    """{name: (T_major, T_minor)} for ``target`` compute-weighted drop rate.

    ``layers``: {name: (score sample [N, k], routed share of the layer's compute)}; the routed share is
    routed / (routed + shared) neurons per token, so shared experts lower the reachable rate.
    """
    def layer_rate(name, t):
        scores, routed_share = layers[name]
        return routed_share * routed_drop_fraction(scores, mode, *_thresholds(t, mode, band))

    if policy == "per_layer":
        return {name: _thresholds(_bisect(lambda t, n=name: layer_rate(n, t), target), mode, band) for name in layers}
    mean_rate = lambda t: sum(layer_rate(n, t) for n in layers) / max(len(layers), 1)  # noqa: E731
    t = _bisect(mean_rate, target)
    return {name: _thresholds(t, mode, band) for name in layers}


def measured_rate(layers: dict[str, tuple[torch.Tensor, float]], thresholds: dict[str, tuple[float, float]],
                  mode: str) -> float:
    """The compute-weighted rate the thresholds give on the samples (layers weighted equally: same tokens)."""
    rates = [share * routed_drop_fraction(scores, mode, *thresholds[name]) for name, (scores, share) in layers.items()]
    return sum(rates) / max(len(rates), 1)
