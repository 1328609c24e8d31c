"""Kernel launches with less host time: a compiled Triton binary replayed with raw pointers.

``kernel[grid](...)`` binds and specialises every argument on every call (tens of µs for our kernels, more
with many constexprs; ``benchmarks/moe_host.py``). After one launch through Triton, ``Kernel.replay`` calls
the compiled binary's launcher directly, as ``JITFunction.run`` itself does after binding. That is valid
while the kernel would be specialised the same way: the same scalars and constexprs (fixed per
``Kernel``), and tensors of the same dtype, strides and 16-byte alignment (``signature``). The MoE plans of
``dispatch.py`` hold their ``Kernel``s; ``launch`` keeps one per (kernel, grid, scalars, constexprs) for the
smaller launches of expert parallelism.
"""

import torch
from triton import knobs as _knobs

from dsmoe_compiler.codegen import INTERPRETED
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Activation dtypes the kernels run; others (fp64) run the reference (``dispatch.moe_triton``, EP's operators)."""
FAST_LAUNCH = not INTERPRETED
"""Replay recorded kernels (``dispatch.FAST_LAUNCH`` for the plans; off under the interpreter)."""


def hooks_on() -> bool:
    """A Triton launch hook (e.g. the proton profiler) wants every launch to go through Triton."""
    hook = _knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class Kernel:
    """One launch of a plan: pointers first, then fixed scalars, then constexprs (all our kernels' order).

    ``launch`` goes through Triton (and records the compiled kernel); ``replay`` calls the compiled
    binary's launcher directly with raw pointers, as ``JITFunction.run`` itself does after binding.
    """

    __slots__ = ("kernel", "grid_fn", "scalars", "constexprs", "grid", "args_tail", "run", "function", "metadata")

    def __init__(self, kernel, grid_fn, scalars, constexprs):
        self.kernel, self.grid_fn, self.scalars, self.constexprs = kernel, grid_fn, tuple(scalars), constexprs
        self.run = None

    def launch(self, ptrs, record: bool):
        compiled = self.kernel[self.grid_fn](*ptrs, *self.scalars, **self.constexprs)
        self.run = None
        if not record or compiled is None or not hasattr(compiled, "packed_metadata"):
            return
        jit = self.kernel
        while not hasattr(jit, "params"):  # Autotuner (and Heuristics) wrap the JITFunction in .fn
            jit = jit.fn
        meta = dict(self.constexprs)
        best = getattr(self.kernel, "best_config", None)
        if best is not None:
            meta.update(best.kwargs)
        names = [p.name for p in jit.params]
        fixed = len(ptrs) + len(self.scalars)
        if any(n not in meta for n in names[fixed:]):
            return
        grid = self.grid_fn(meta) if callable(self.grid_fn) else self.grid_fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.args_tail = self.scalars + tuple(meta[n] for n in names[fixed:])
        self.function, self.metadata, self.run = compiled.function, compiled.packed_metadata, compiled.run

    def replay(self, stream: int, ptrs):
        g = self.grid
        self.run(g[0], g[1], g[2], stream, self.function, self.metadata, None, None, None, *ptrs, *self.args_tail)


def signature(tensors) -> tuple:
    """What a compiled kernel was specialised on, per tensor argument: dtype, strides, 16-byte alignment."""
    return tuple(None if t is None else (t.dtype, t.stride(), t.data_ptr() & 15 == 0) for t in tensors)


_RECORDED: dict = {}
_MAX_RECORDED = 4096


def launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, constexprs: dict) -> None:
    """``kernel[grid](*tensors, *scalars, **constexprs)``, every constexpr given. The first call for a (kernel, grid,
    scalars, constexprs) goes through Triton and records it; later calls with tensors of the same signature
    replay it on the current stream. Through Triton every time on CPU (the interpreter), with a launch hook on,
    or when the tensors' signature changed."""
    if not (FAST_LAUNCH and tensors[0].is_cuda):
        kernel[grid](*tensors, *scalars, **constexprs)
        return
    device = tensors[0].device.index  # a compiled binary is loaded per device
    key = (kernel, grid, scalars, tuple(constexprs.items()), device)
    sig = signature(tensors)
    recorded = _RECORDED.get(key)
    if recorded is not None and recorded[1] == sig and not hooks_on():
        stream = torch._C._cuda_getCurrentRawStream(device)
        recorded[0].replay(stream, [t.data_ptr() for t in tensors])
        return
    k = Kernel(kernel, grid, scalars, constexprs)
    k.launch(tensors, record=all(s[2] for s in sig))
    if len(_RECORDED) >= _MAX_RECORDED:
        _RECORDED.clear()
    _RECORDED[key] = (k, sig) if k.run is not None else (k, None)
