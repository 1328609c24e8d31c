"""Small FX helpers shared by the recognisers."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_VIEW_METHODS = {"view", "reshape", "flatten", "contiguous"}
CASTS = frozenset({"float", "to", "type", "type_as", "half", "bfloat16", "double"})
VIEWS = frozenset({"view", "reshape", "squeeze", "flatten", "contiguous"})
"""Tensor methods the router reading of ``route_graph`` looks through (a squeezed [1, E] bias: Ernie-4.5)."""
LINEARS = (torch.nn.functional.linear, torch._C._nn.linear)
"""How a ``linear`` appears in dynamo's graphs."""
_KEY = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def is_call(node, functions=(), methods=()) -> bool:
    """node is an FX call of one of ``functions`` or of one of the tensor ``methods``."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in methods))


def strip(node, methods):
    """Skip the tensor ``methods`` (casts, views) in front of a node."""
    while is_call(node, methods=methods):
        node = node.args[0]
    return node


def topk_of(node, item: int):
    """The ``topk`` node of which node is output ``item`` (0 values, 1 indices), else None."""
    if is_call(node, (operator.getitem,)) and node.args[1] == item and is_call(node.args[0], (torch.topk,), ("topk",)):
        return node.args[0]
    return None


def source_path(node: fx.Node) -> str | None:
    """Dotted module path of a placeholder holding a parameter/buffer ("model.layers.0.mlp.gate.weight")."""
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    keys = [k for k in _KEY.findall(source.name) if k != "self"]
    return ".".join(keys) if keys else None


def _params(node: fx.Node):
    for arg in node.all_input_nodes:
        if arg.op == "placeholder":
            yield arg
        elif arg.op == "call_function" and arg.target in (list, tuple):
            yield from _params(arg)


def _module_path(node: fx.Node) -> str | None:
    """The innermost module whose forward made the node ("model.layers.0.mlp"), from dynamo's module stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = re.sub(r"\[(\d+)\]", r".\1", str(list(stack.values())[-1][0]))
    parts = [p for p in re.sub(r"^L\['self'\]\.?", "", path).split(".") if p]
    while parts and parts[-1] in ("experts", "gate", "router"):
        parts.pop()
    return ".".join(parts) or None


def block_name(node: fx.Node) -> str | None:
    """The MoE block's module path, from the longest common prefix of its parameters' paths (a dotted path: a bare
    name is an input of the frame, ``L['x']``, not a module's tensor)."""
    paths = [p.split(".") for a in node.all_input_nodes for p in [source_path(a)] if p and "." in p]
    for a in node.args:
        if isinstance(a, (list, tuple)):
            paths += [p.split(".") for n in a if isinstance(n, fx.Node) for p in [source_path(n)] if p and "." in p]
    if not paths:
        return _module_path(node)
    prefix = paths[0][:-1]
    for p in paths[1:]:
        n = 0
        while n < min(len(prefix), len(p) - 1) and prefix[n] == p[n]:
            n += 1
        prefix = prefix[:n]
    if prefix and prefix[-1] in ("experts", "gate", "router"):
        prefix = prefix[:-1]
    return ".".join(prefix) or None


def strip_views(node: fx.Node) -> fx.Node:
    while node.op == "call_method" and node.target in _VIEW_METHODS:
        node = node.args[0]
    return node


def same_base(a: fx.Node, b: fx.Node) -> bool:
    """Whether a and b hold the same values up to view/reshape."""
    return strip_views(a) is strip_views(b)


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def ssa_inplace(gm: fx.GraphModule) -> int:
    """Make in-place tensor methods explicit in the data flow (``out.index_add_(...)`` returns ``out``).

    Later uses of the mutated tensor are rewired to the in-place node itself, which is exact because
    in-place tensor methods return their ``self``. Afterwards the MoE region of a loop that accumulates
    with ``index_add_`` ends in one node that the recogniser can replace.
    """
    rewired = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_method" or not node.target.endswith("_") or node.target.startswith("__"):
            continue
        target = node.args[0]
        if not isinstance(target, fx.Node) or isinstance(example_value(target), torch.SymInt):
            continue
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
                rewired += 1
    return rewired


def region_between(end: fx.Node, x: fx.Node) -> list[fx.Node]:
    """Non-placeholder ancestors of ``end`` (inclusive) that do not compute ``x`` itself."""
    before_x, stack = set(), [x]
    while stack:
        n = stack.pop()
        if n not in before_x:
            before_x.add(n)
            stack.extend(n.all_input_nodes)
    region, stack = set(), [end]
    while stack:
        n = stack.pop()
        if n in region or n in before_x or n.op == "placeholder":
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in end.graph.nodes if n in region]


class InputWritesUndone(TorchDispatchMode):
    """Backs up each piece of an example input that an op is about to write, and puts it back on exit.

    The numeric checks run the user's graph once more on the real inputs, and some graphs write into them: a static
    KV cache (``index_copy_`` of the new keys, ``cumulative_length.add_``), a counter buffer. Without this, every
    compile would advance such state by one extra step: the next real call then writes the cache at the wrong
    position (a wrong answer, or transformers' ``index_copy_`` out of bounds). Writes are seen on the aten ops
    (schema arguments marked ``a!``), so in-place methods, ``out=`` and ``setitem`` through views are all caught.
    What is copied is what the op writes: the written view, or for ``index_copy_`` / ``index_put_`` only the indexed
    rows (a static cache is written a few rows at a time, and a whole copy of it could run a GPU out of memory).
    Restored newest first, so overlapping writes come back to the first state (property test
    ``test_capture_user.py::test_any_sequence_of_input_writes_is_undone``)."""

    def __init__(self, inputs):
        super().__init__()
        self._storages = {_storage_address(t) for t in inputs if isinstance(t, torch.Tensor)} - {None}
        self._undo: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for target in _written_tensors(func, args, kwargs):
            if _storage_address(target) in self._storages:
                self._undo.append(_undo_of(func, target, args))
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        super().__exit__(*exc)  # off the mode stack first: the writes back are not writes to record
        undo, self._undo = self._undo, []
        for put_back in reversed(undo):
            put_back()


def _storage_address(t: torch.Tensor) -> int | None:
    """Where ``t``'s storage starts; None for an empty one or one that cannot be read (sparse tensors, wrapper
    subclasses such as DTensor). Writes into those are not undone: a known gap, no such input is written in place by
    the models we test."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr() if storage.nbytes() > 0 else None


def _undo_of(func, target, args):
    """A call that puts back what ``func`` is about to write into ``target``."""
    aten = torch.ops.aten
    if func is aten.index_copy_.default and args[0] is target:
        dim, index = args[1], args[2]
        rows = target.index_select(dim, index)
        return lambda: target.index_copy_(dim, index, rows)
    if func is aten.index_put_.default and args[0] is target:
        indices = args[1]
        rows = aten.index.Tensor(target, indices)
        return lambda: aten.index_put_.default(target, indices, rows, False)
    whole = target.clone()
    return lambda: target.copy_(whole)


def _written_tensors(func, args, kwargs):
    schema = getattr(func, "_schema", None)
    if schema is None:
        return
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                yield t


def recorded_values(gm: fx.GraphModule, example_inputs, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Run the graph once on its example inputs (no grad) and keep the values of ``wanted``. The run leaves the
    user's state as it found it: it draws from forked random generators (dropout, PhiMoE's sampling in training),
    and what it writes into its inputs (a static KV cache) is put back (``InputWritesUndone``; test
    ``test_capture_user.py::test_a_check_run_leaves_written_inputs_as_they_were``)."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if isinstance(n.target, torch._ops.HigherOrderOperator):  # HOPs (flex attention) take no dispatch mode
                with _disable_current_modes():
                    out = super().run_node(n)
            else:
                out = super().run_node(n)
            if n in wanted:
                values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            return out

    def concrete(v):  # dynamic-shape graphs take sizes as SymInt inputs: run with their hints
        return int(v.node.hint) if isinstance(v, torch.SymInt) and v.node.hint is not None else v

    devices = sorted({v.device.index or 0 for v in example_inputs if isinstance(v, torch.Tensor) and v.is_cuda})
    with torch.no_grad(), torch.random.fork_rng(devices=devices), InputWritesUndone(example_inputs):
        Recorder(gm).run(*[concrete(v) for v in example_inputs])
    return values
