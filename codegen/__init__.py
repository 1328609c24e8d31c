"""Kernels for the MoE operator; reference.py is the semantics every kernel is tested against."""

import os as _os

INTERPRETED = _os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter is on: the kernels run on CPU tensors (the tests). Read here, where triton is not
imported, so the operator can ask without it."""
