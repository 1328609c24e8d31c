"""dualsparse: a torch.compile backend for Mixture-of-Experts inference (DualSparse-MoE).

    torch.compile(model, backend="dualsparse", options={...})
"""

import pathlib as _pathlib

# In a source checkout the subpackages passes/, codegen/ and runtime/ sit beside this folder (pyproject's
# package-dir). Run from the checkout's root (``python -m dsmoe_compiler demo``), Python finds this folder before any
# installed copy, and a normal (non-editable) install's files are then not the ones imported: look beside it too.
_CHECKOUT = _pathlib.Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "codegen" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

from dsmoe_compiler.backend import dualsparse_backend  # noqa: E402
from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec, SharedSpec  # noqa: E402
from dsmoe_compiler.options import Options  # noqa: E402
from dsmoe_compiler.report import last_report  # noqa: E402
from dsmoe_compiler.runtime.calibrate import calibrate  # noqa: E402
from dsmoe_compiler.runtime.plan import Plan  # noqa: E402
from dsmoe_compiler.runtime.state import drop_stats, reset_drop_stats, set_block_thresholds, set_thresholds  # noqa: E402

__all__ = ["dualsparse_backend", "last_report", "MoESpec", "RoutingSpec", "ExpertsSpec", "SharedSpec", "Options",
           "calibrate", "Plan", "drop_stats", "reset_drop_stats", "set_thresholds", "set_block_thresholds"]
