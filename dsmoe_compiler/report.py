"""What the backend did: rewritten MoE blocks, blocks left alone and why, and pass counters."""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field


@dataclass
class BlockEntry:
    name: str
    variant: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    form: str
    """How the block reached us: transformers markers, user ModuleList, user 3-D weights."""


@dataclass
class LeftAlone:
    name: str
    reason: str


@dataclass
class Report:
    rewritten: list[BlockEntry] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    graphs: int = 0
    counters: collections.Counter = field(default_factory=collections.Counter)
    """Pass counters: how often each rewrite fired (inductor fx_passes style)."""

    @contextlib.contextmanager
    def undone_on_error(self):
        """What one backend call adds is taken back if the call raises. Under ``dynamic=True``, AOT autograd raises
        ``TensorifyScalarRestartAnalysis`` when a float that dynamo had turned into a tensor was specialised while
        tracing (``transformers_hf.constant_plan`` does that), and dynamo traces again and calls the backend on the
        new graph: the report counts one graph, and its blocks once
        (``test_capture_hf.py::test_dynamic_shapes_compile_one_graph``)."""
        kept = (len(self.rewritten), len(self.left_alone), self.graphs, collections.Counter(self.counters))
        try:
            yield self
        except BaseException:
            del self.rewritten[kept[0]:], self.left_alone[kept[1]:]
            self.graphs, self.counters = kept[2], kept[3]
            raise

    def __str__(self) -> str:
        lines = [f"dualsparse: {self.graphs} graph(s), {len(self.rewritten)} MoE block(s) rewritten, "
                 f"{len(self.left_alone)} left alone"]
        if self.rewritten:
            header = ("block", "form", "routing", "hidden", "inter", "experts", "top-k")
            rows = [(b.name, b.form, b.variant, str(b.hidden), str(b.intermediate), str(b.experts), str(b.top_k))
                    for b in self.rewritten]
            lines += _table(header, rows)
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {b.name}: {b.reason}" for b in self.left_alone]
        if self.counters:
            lines.append("passes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items())))
        return "\n".join(lines)


def _table(header, rows):
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]


_REPORT = Report()


def current() -> Report:
    return _REPORT


def last_report() -> Report:
    """Everything the backend compiled since the last ``torch._dynamo.reset()`` (or process start)."""
    return _REPORT


def reset() -> None:
    global _REPORT
    _REPORT = Report()
