"""dualsparse: a torch.compile backend for Mixture-of-Experts inference (DualSparse-MoE).

    torch.compile(model, backend="dualsparse", options={...})
"""

from dsmoe_compiler.backend import dualsparse_backend
from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec, SharedSpec
from dsmoe_compiler.options import Options
from dsmoe_compiler.report import last_report
from dsmoe_compiler.runtime.calibrate import calibrate
from dsmoe_compiler.runtime.plan import Plan
from dsmoe_compiler.runtime.state import drop_stats, reset_drop_stats, set_block_thresholds, set_thresholds

__all__ = ["dualsparse_backend", "last_report", "MoESpec", "RoutingSpec", "ExpertsSpec", "SharedSpec", "Options",
           "calibrate", "Plan", "drop_stats", "reset_drop_stats", "set_thresholds", "set_block_thresholds"]
