"""MoE-looking modules that no recogniser captured: one warning each, so none runs slowly unnoticed.

A block the recognisers read but cannot run says why through a ``left_alone`` marker. A block none of them reads
(product-key experts such as Doge's, an eager loop that breaks the graph into pieces) would otherwise pass
silently. The graph's nodes name the modules that made them (dynamo's ``nn_module_stack``); a module whose class
name reads as an MoE block or its experts (``MOE_CLASS``), that multiplies in its own code (not in a linear, an MLP
or a router inside it), and that holds no ``dualsparse.moe`` call and was not reported as left alone, is reported
here. Only the report changes: the module's ops stay as they are (exact).
Test: ``tests/test_capture_aliases.py::test_unmatched_moe_module_warns``.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from dsmoe_compiler.report import LeftAlone, Report

MOE_CLASS = re.compile(r"(MoE|Moe)(Block|Layer)?$|SparseMoe|(?<!Shared)Experts$")
"""Class names of MoE blocks and of their experts (``DogeCDMoE``, ``MixtralSparseMoeBlock``, ``DbrxExperts``); not
shared experts, which are plain MLPs."""
_HELPER = re.compile(r"^Linear$|MLP|Mlp|Shared|Router|Gate$|Gating")
"""Modules whose products are not the routed experts' (the innermost module of the product decides)."""
PRODUCTS = frozenset({torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.addmm, torch.baddbmm,
                      torch.nn.functional.linear, torch._C._nn.linear, operator.matmul,
                      *([torch._grouped_mm] if hasattr(torch, "_grouped_mm") else [])})
_FRAME_NAME = re.compile(r"^[LG]\['([^']+)'\]")


def _path(source: str) -> str:
    """Dynamo's source of a module (``L['self'].model.layers[0].mlp``, ``G['layers'][0]``) as a dotted path
    (``model.layers.0.mlp``, ``layers.0``), as ``graph_utils.source_path`` names parameters."""
    path = _FRAME_NAME.sub(r"\1", re.sub(r"\[(\d+)\]", r".\1", source))
    return path[len("self."):] if path.startswith("self.") else "" if path == "self" else path


def _class_name(cls) -> str:
    return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]


def _modules(node: fx.Node) -> list[tuple[str, str]]:
    return [(_path(str(source)), _class_name(cls)) for source, cls in (node.meta.get("nn_module_stack") or {}).values()]


def _block_of(name: str) -> str:
    """A left-alone entry's name without a trailing router part (a plain-op router is named by its linear)."""
    parts = name.split(".")
    while parts and parts[-1] in ("router", "gate", "layer"):
        parts.pop()
    return ".".join(parts)


def _covers(a: str, b: str) -> bool:
    """One of the two paths is the other or inside it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or not a or not b


def _products(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in PRODUCTS) or (
        node.op == "call_method" and node.target in ("matmul", "bmm", "mm", "__matmul__"))


def _candidate(node: fx.Node) -> tuple[str, str] | None:
    """The innermost MoE-looking module of a product node; None where the product's own module is a plain linear, an
    MLP (a shared expert), a router or a gate, unless it sits in an ``experts`` ModuleList."""
    modules = _modules(node)
    in_experts = any(part == "experts" for part in modules[-1][0].split(".")) if modules else False
    if not modules or (_HELPER.search(modules[-1][1]) and not in_experts):  # an expert MLP of a ModuleList counts
        return None
    return next(((p, c) for p, c in reversed(modules) if MOE_CLASS.search(c)), None)


def unmatched_modules(gm: fx.GraphModule, left_alone_names=()) -> dict[str, str]:
    """{path: class name} of the MoE-looking modules whose own products (``_candidate``) ``gm`` holds with no
    ``dualsparse.moe`` node inside them, outside the blocks named in ``left_alone_names``."""
    candidates: dict[str, str] = {}
    captured = {_block_of(name) for name in left_alone_names}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.dualsparse.moe.default:
            captured.update(p for p, c in _modules(node) if MOE_CLASS.search(c))
        elif _products(node) and _candidate(node) is not None:
            candidates.setdefault(*_candidate(node))
    return {p: c for p, c in candidates.items() if not any(_covers(p, h) for h in captured)}


def report_unmatched(gm: fx.GraphModule, report: Report, left_alone_names=()) -> list[LeftAlone]:
    """Add a ``LeftAlone`` entry for each MoE-looking class not yet reported in this compile; returns the new ones."""
    known = {entry.reason for entry in report.left_alone}
    new = []
    for path, name in unmatched_modules(gm, left_alone_names).items():
        reason = f"{name} looks like an MoE block but matches no form dualsparse captures; it runs as plain ops"
        if reason not in known:
            known.add(reason)
            new.append(LeftAlone(path or name, reason))
    report.left_alone += new
    return new
