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
}


@dataclass(frozen=True)
class Options:
    kernels: str = "auto"
    """MoE kernels: "triton" (GPU), "reference" (plain torch), "auto" (triton on CUDA, else reference)."""
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
        if options.get("dump_dir") is None and os.environ.get("DUALSPARSE_DUMP_DIR"):
            options["dump_dir"] = os.environ["DUALSPARSE_DUMP_DIR"]
        return Options(**options)
