"""Test support: skip the Triton interpreter's redundant re-patching of ``triton.language`` in device-function calls.

Under ``TRITON_INTERPRET=1`` a kernel launch (``GridExecutor.__call__``) swaps the ``triton.language`` builtins for
their interpreted versions, runs every program, and restores them. Each call of a ``@triton.jit`` helper inside a
program (``_tile``, ``_glu``, ``locate``, ...) patches the same modules again (``_InterpretedFunction.__call__``) and
throws its patch scope away. The launch's own patch is then already in place, so the second patch changes nothing,
but it walks every member of ``tl``, ``tl.tensor`` and ``tl.math`` each time: 8.5 of 25 s in one drop-mask case of
``test_kernels.py`` (cProfile, Triton 3.9), a third of the interpreter's time over the kernel cases.

``tl.sort`` (the grouping kernels' bitonic sort) reduces with ``_xor_combine``, which the interpreter has no numpy
path for: it calls the combine function per element in Python (``ReduceOps.generic_reduce``). The patch gives that
one combine function ``np.bitwise_xor.reduce``, as the interpreter's own ``sum`` path uses ``np.sum``.

It also caches ``interpreter._get_np_dtype``, which builds a dict of 17 numpy dtypes at each of its calls (about
300 000 calls, 5.8 of 47 s in cProfile of eight layout cases): the answer depends only on the element type.

``install()`` wraps ``interpreter._patch_lang``: a call made while a launch is running, for a function whose language
modules (``tl``, ``tl.core``) that launch has already patched, returns without patching. Any other call (the launch's
own, or a helper that sees a module the launch did not patch, e.g. ``triton.language.standard``'s functions, which see
``tl.core``) patches as before and records what it patched. If Triton's internals are not the ones this was written
against, ``install()`` does nothing and the tests run at the interpreter's own speed.
"""

import functools
import inspect

_patched_in_launch: set = set()  # ids of the language modules patched by the running launch
_launch_depth = [0]


@functools.lru_cache(maxsize=None)
def _language_modules(fn) -> frozenset:
    import triton.language as tl

    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def install() -> bool:
    """Wrap the interpreter's patching as the module docstring says; True when it did."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor = getattr(interpreter, "GridExecutor", None)
    original = getattr(interpreter, "_patch_lang", None)
    if executor is None or original is None or getattr(original, "_dualsparse_wrapped", False):
        return False
    launch = executor.__call__

    def patch_lang(fn):
        langs = _language_modules(fn)
        if _launch_depth[0] and langs <= _patched_in_launch:
            return None  # the device-function call site drops the scope; a launch never gets here
        scope = original(fn)
        if _launch_depth[0]:
            _patched_in_launch.update(langs)
        return scope

    def run_launch(self, *args, **kwargs):
        # the launch's own _patch_lang call comes first inside it and finds nothing recorded: it patches, and records
        _patched_in_launch.clear()
        _launch_depth[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            _launch_depth[0] -= 1
            _patched_in_launch.clear()

    patch_lang._dualsparse_wrapped = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = run_launch
    _cache_np_dtypes(interpreter)
    _xor_reduce_in_numpy(interpreter)
    return True


def _xor_reduce_in_numpy(interpreter) -> None:
    """``tl.reduce(..., _xor_combine)`` (``tl.standard.xor_sum``) by numpy instead of per element in Python."""
    import numpy as np
    import triton.language as tl

    ops = getattr(interpreter, "ReduceOps", None)
    xor = getattr(tl.standard, "_xor_combine", None)
    if ops is None or xor is None or not hasattr(ops, "apply_impl") or not hasattr(ops, "to_tensor"):
        return
    original = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is not xor:
            return original(self, input)
        data = input[0].handle.data
        return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims), input[0].dtype)

    ops.apply_impl = apply_impl


def _cache_np_dtypes(interpreter) -> None:
    """``_get_np_dtype`` memoised on the element type (a block's answer is its element type's; a pointer's is
    uint64 either way)."""
    import triton.language as tl

    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None:
        return
    found: dict = {}

    def get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        try:
            return found[scalar]
        except KeyError:
            found[scalar] = answer = original(scalar)
            return answer
        except TypeError:  # an unhashable type (pointers): as before
            return original(tt_dtype)

    interpreter._get_np_dtype = get_np_dtype
