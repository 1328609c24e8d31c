"""Backend options: ``torch.compile(model, backend="dualsparse", options={...})`` validated into one dataclass."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

try:  # dynamo re-raises ShortenTraceback subclasses as they are instead of wrapping them in BackendCompilerFailed
    from torch._dynamo.exc import ShortenTraceback as _PassThrough
except ImportError:  # pragma: no cover - older torch
    _PassThrough = Exception


class OptionsError(ValueError, _PassThrough):
    """Invalid ``options``: a ValueError that reaches the caller of the compiled model unwrapped."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.first_useful_frame = None


_CHOICES = {
    "kernels": ("auto", "triton", "reference"),
    "inner": ("inductor", "eager", "aot_eager"),
    "transform": ("partial", "complete"),
    "drop": ("none", "1t", "2t", "topk", "skip"),
    "threshold_policy": ("global", "per_layer"),
    "mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


@dataclass(frozen=True)
class Options:
    kernels: str = "auto"
    """MoE kernels: "triton" (GPU), "reference" (plain torch), "auto" (triton on CUDA; on a CPU the reference with its
    experts as grouped products where they apply, ``codegen/cpu_grouped.py``)."""
    inner: str = "inductor"
    """Compiler for the rest of each graph; "eager"/"aot_eager" are cheap ones for tests and debugging."""
    partition: int = 1
    """P: split every expert into P sub-experts (P must divide the intermediate size)."""
    transform: str = "partial"
    """How partition is applied: "partial" (after top-k) or "complete" (router repeated, top-(k*P))."""
    dump_dir: str | None = None
    """Write every graph before/after each pass (text) and a picture of each MoE subgraph here."""
    plan: Any = None
    """A calibration ``Plan`` (or the path of a saved one): reorder every expert's neurons by importance,
    in place (passes/reconstruct.py); makes ``partition`` default to 2 (Major/Minor halves)."""

    drop: str = "none"
    """Dropping: "1t" (one threshold per pair), "2t" (Major/Minor halves, implies partition 2); baselines
    "topk" (static top-(k-1)) and "skip" (Lu et al.'s skipping, threshold = beta)."""
    threshold: float | None = None
    """1T threshold T on normalised scores; for 2T the centre of (T - band, T + band)."""
    t_major: float | None = None
    """2T: the Major half of a pair is kept iff its normalised score >= t_major."""
    t_minor: float | None = None
    """2T: the Minor half is kept iff its normalised score >= t_minor."""
    band: float = 0.01
    """2T: half-width of (T_major, T_minor) around ``threshold`` (the paper's ±0.01)."""
    drop_rate: float | None = None
    """Target compute-weighted drop rate; thresholds are fitted to the plan's calibration scores."""
    threshold_policy: str = "global"
    """With drop_rate: one "global" threshold for all layers, or "per_layer" thresholds (equal rate per layer)."""
    stats: bool = False
    """Accumulate per-layer drop statistics on the device; read them with ``dsmoe_compiler.drop_stats()``."""
    mode: str | None = None
    """torch.compile's mode for the inner inductor compile (e.g. "reduce-overhead": CUDA graphs), for when
    ``options`` are given too (torch.compile refuses ``mode`` together with ``options``)."""
    expert_parallel: Any = False
    """Expert parallelism (passes/expert_parallel.py): True (the default process group) or a ProcessGroup;
    each rank runs its own tokens and computes a contiguous range of the E*P sub-experts."""

    def kernel_impl(self, on_cuda: bool) -> str:
        """The ``impl`` argument of the MoE operators: "triton" when asked for, or on CUDA under "auto"; "grouped" (the
        reference's experts as grouped products, ``codegen/cpu_grouped.py``) on the CPU under "auto"."""
        if self.kernels == "triton" or (self.kernels == "auto" and on_cuda):
            return "triton"
        return "grouped" if self.kernels == "auto" else "reference"

    @staticmethod
    def from_dict(options: dict[str, Any] | None) -> "Options":
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(Options)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise OptionsError(f"dualsparse: unknown option {unknown[0]!r}; allowed options: {sorted(names)}")
        for key, allowed in _CHOICES.items():
            if key in options and options[key] not in allowed:
                raise OptionsError(f"dualsparse: option {key!r} must be one of {allowed}, got {options[key]!r}")
        if "partition" in options:
            p = options["partition"]
            if not isinstance(p, int) or isinstance(p, bool) or p < 1:
                raise OptionsError(f"dualsparse: option 'partition' must be an integer >= 1, got {p!r}")
        if options.get("plan") is not None:
            from dsmoe_compiler.runtime.plan import Plan

            if not isinstance(options["plan"], (Plan, str, os.PathLike)):
                raise OptionsError(f"dualsparse: option 'plan' must be a Plan or a path, got {type(options['plan'])}")
            options.setdefault("partition", 2)
        _check_drop(options)
        _check_expert_parallel(options)
        if options.get("dump_dir") is None and os.environ.get("DUALSPARSE_DUMP_DIR"):
            options["dump_dir"] = os.environ["DUALSPARSE_DUMP_DIR"]
        return Options(**options)


def _number(options, key, low, high):
    value = options.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high):
        raise OptionsError(f"dualsparse: option {key!r} must be a number in [{low}, {high}], got {value!r}")


def _check_drop(options) -> None:
    for key, low, high in (("threshold", 0.0, 1e9), ("t_major", 0.0, 1e9), ("t_minor", 0.0, 1e9),
                           ("band", 0.0, 1.0), ("drop_rate", 0.0, 0.999)):
        _number(options, key, low, high)
    if "stats" in options and not isinstance(options["stats"], bool):
        raise OptionsError(f"dualsparse: option 'stats' must be True or False, got {options['stats']!r}")
    mode = options.get("drop", "none")
    given = {k for k in ("threshold", "t_major", "t_minor", "drop_rate") if options.get(k) is not None}
    if mode == "none":
        if given:
            raise OptionsError(f"dualsparse: option {sorted(given)[0]!r} needs option 'drop' = '1t' or '2t'")
        return
    if options.get("drop_rate") is not None and options.get("plan") is None:
        raise OptionsError("dualsparse: option 'drop_rate' needs option 'plan' (calibration scores to fit thresholds)")
    if mode in ("1t", "skip") and not given & {"threshold", "drop_rate"}:
        raise OptionsError(f"dualsparse: drop={mode!r} needs option 'threshold' or 'drop_rate'")
    if mode == "topk" and given:
        raise OptionsError(f"dualsparse: drop='topk' takes no threshold; got option {sorted(given)[0]!r}")
    if mode == "2t" and not (given & {"threshold", "drop_rate"} or {"t_major", "t_minor"} <= given):
        raise OptionsError("dualsparse: drop='2t' needs options 't_major' and 't_minor', or 'threshold', or 'drop_rate'")
    if mode == "2t" and {"t_major", "t_minor"} <= given and options["t_major"] > options["t_minor"]:
        raise OptionsError("dualsparse: option 't_major' must be <= 't_minor' (the Major half is kept more readily)")


def _check_expert_parallel(options) -> None:
    value = options.get("expert_parallel", False)
    if value is False or value is True:
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        raise OptionsError(f"dualsparse: option 'expert_parallel' must be True, False or a ProcessGroup, got {value!r}")
