"""The ``dualsparse`` dynamo backend: capture MoE blocks, run the passes, hand the rest to inductor."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.fx as fx

from dsmoe_compiler import dump, gradients, ops  # noqa: F401  (ops registers torch.ops.dualsparse.*)
from dsmoe_compiler import report as report_mod
from dsmoe_compiler.capture import fold_shared, fuse_markers, route_graph, transformers_hf, unmatched, user_moe
from dsmoe_compiler.capture.graph_utils import ssa_inplace
from dsmoe_compiler.options import Options

log = logging.getLogger("dsmoe_compiler")


def _set_impl(gm: fx.GraphModule, options: Options, example_inputs) -> None:
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    impl = options.kernel_impl(on_cuda)
    has_moe = any(node.target is fuse_markers.MOE for node in gm.graph.nodes)
    if impl == "triton" and not on_cuda and not ops.INTERPRETED and has_moe:
        warnings.warn("dualsparse: kernels='triton' needs CUDA inputs (or TRITON_INTERPRET=1); this graph's are on the "
                      "CPU, so its MoE blocks run the reference implementation", stacklevel=2)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fuse_markers.MOE:
            x, params, spec = node.args[:3]
            node.args = (x, params, spec, impl)


def _refresh_report(gm: fx.GraphModule, report) -> None:
    """Show each block's routing variant as the passes left it (partition, drop...)."""
    from dsmoe_compiler.codegen.reference import parse_spec

    final = {parse_spec(n.args[2]).name: parse_spec(n.args[2]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target is fuse_markers.MOE}
    for entry in report.rewritten:
        if entry.name in final:
            entry.variant = final[entry.name].variant


def _run_passes(gm: fx.GraphModule, options: Options, report, dumper) -> None:
    from dsmoe_compiler.passes import PASSES

    for name, run in PASSES:
        if run(gm, options, report):
            gm.recompile()
            dumper.graph(gm, f"after_{name}")


def _inner_compile(gm: fx.GraphModule, example_inputs, options: Options, mode: str | None):
    if options.inner == "eager":
        return gm.forward
    if options.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    # torch.compile(..., mode="reduce-overhead" | "max-autotune") means for the rest of the graph what it
    # means for inductor; our operator has no host synchronisation, so CUDA graphs capture it too.
    with torch._inductor.config.patch(list_mode_options(mode or "default")):
        return compile_fx(gm, example_inputs)


def dualsparse_backend(gm: fx.GraphModule, example_inputs, *, mode=None, options=None):
    """``torch.compile(model, backend="dualsparse", options={...})``."""
    opts = Options.from_dict(options)
    with report_mod.current().undone_on_error() as report:
        return _compile(gm, example_inputs, opts, report, mode)


def _compile(gm: fx.GraphModule, example_inputs, opts: Options, report, mode):
    report.graphs += 1
    dumper = dump.Dumper(opts.dump_dir, report.graphs)
    dumper.graph(gm, "captured")

    already_left = len(report.left_alone)
    fuse_markers.collect_left_alone(gm, report)
    if ssa_inplace(gm):
        report.counters["ssa_inplace"] += 1
    try:
        if route_graph.capture_plain_routers(gm, example_inputs):
            report.counters["route_graph"] += 1
    except Exception as error:  # a recogniser bug must never break the user's compile: the markers stay (exact)
        log.warning("dualsparse: plain-op routers not read: %r", error)
        report.counters["route_graph_failed"] += 1
    fuse_markers.fuse_markers(gm, report)
    user_moe.capture_user_moe(gm, example_inputs, opts, report)
    try:
        fold_shared.fold_shared_experts(gm, example_inputs, report)
    except Exception as error:  # folding is an optimisation: the shared experts stay plain ops (exact)
        log.warning("dualsparse: shared experts not folded: %r", error)
        report.counters["fold_shared_failed"] += 1
    unmatched.report_unmatched(gm, report, [entry.name for entry in report.left_alone[already_left:]])
    for entry in report.left_alone[already_left:]:
        warnings.warn(f"dualsparse: MoE block {entry.name} left to the inner compiler: {entry.reason}", stacklevel=2)
    gm.recompile()
    dumper.graph(gm, "after_capture")
    _run_passes(gm, opts, report, dumper)
    _refresh_report(gm, report)
    _set_impl(gm, opts, example_inputs)
    if gradients.bind_gradients(gm, example_inputs):
        report.counters["bind_gradients"] += 1
        warnings.warn("dualsparse: this graph was compiled with gradients enabled, so its MoE blocks' backward reruns "
                      "their reference implementation (exact, but a training step is slower than under inductor); for "
                      "inference, call the model under torch.no_grad() or torch.inference_mode()",
                      stacklevel=2)
    gm.recompile()
    dumper.moe_pictures(gm)
    log.info("%s", report)
    return _inner_compile(gm, example_inputs, opts, mode or opts.mode)


@contextlib.contextmanager
def _capture_context():
    """Entered around every call of a model compiled with dualsparse (tracing included)."""
    with transformers_hf.TransformersCapture(), torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True
    ):
        yield


def _reset() -> None:
    """Called by ``torch._dynamo.reset()``: forget the report and the blocks' run-time state."""
    from dsmoe_compiler.runtime import ep, state

    report_mod.reset()
    state.clear()
    ep.clear()


dualsparse_backend.backend_ctx_ctor = _capture_context
dualsparse_backend.reset = _reset


def _forward_backend_ctx_through_torch_compile() -> None:
    """Let ``torch.compile(backend=...)`` honour ``backend_ctx_ctor`` as ``torch._dynamo.optimize`` does.

    ``torch.compile`` wraps every non-inductor backend in ``_TorchCompileWrapper`` and then in
    ``WrapBackendDebug``; ``optimize`` looks ``backend_ctx_ctor`` up on the outer wrapper only, so a
    backend's context would be lost. Two read-only properties forward the lookup to the wrapped
    backend; backends without the attribute still get ``contextlib.nullcontext``.
    """
    from torch._dynamo.repro.after_dynamo import WrapBackendDebug

    def forward_to(attr):
        return property(lambda self: getattr(getattr(self, attr), "backend_ctx_ctor", contextlib.nullcontext))

    for cls, attr in ((torch._TorchCompileWrapper, "compiler_fn"), (WrapBackendDebug, "_torchdynamo_orig_backend")):
        if "backend_ctx_ctor" not in cls.__dict__:
            cls.backend_ctx_ctor = forward_to(attr)


_forward_backend_ctx_through_torch_compile()
