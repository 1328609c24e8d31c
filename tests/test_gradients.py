"""Gradients through captured MoE blocks (``dsmoe_compiler/gradients.py``).

Before the backward existed, a loss through a compiled model under AOT autograd (the inductor and aot_eager
inner compilers) or the Triton kernels left the routers' and experts' gradients out and gave wrong gradients
upstream, with no error. Here: the compiled model's gradients against eager transformers' (every parameter),
the operator's backward against finite differences (fp64, partition and dropping included), the capture
markers' backward against transformers' own, and the inference graph keeping the operator without autograd.
"""

import pytest
import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import ModuleListMoE, ThreeDMoE, UserBlockModel, hf_model, moe_layer_count, random_ids
from test_partition import blocks, random_params

import dsmoe_compiler
from dsmoe_compiler.ir import DropSpec, ExpertsSpec, MoESpec, RoutingSpec, SharedSpec
from dsmoe_compiler.runtime import state


def _loss_and_grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _compiled_against_eager(model, loss_of, options):
    want, want_grads = _loss_and_grads(model, loss_of)
    compiled = torch.compile(model, backend="dualsparse", options=options)
    got, got_grads = _loss_and_grads(compiled, loss_of)
    got_grads = {name.removeprefix("_orig_mod."): g for name, g in got_grads.items()}
    # a parameter that no pair used this step: no gradient in eager (a branch not taken), zeros in a compiled graph
    # (whose backward cannot depend on the data); a gradient missing on one side is compared as zeros
    names = {n for n, _ in model.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert set(got_grads) <= names and set(want_grads) <= names
    worst = max(((got_grads.get(n, zeros[n]) - want_grads.get(n, zeros[n])).norm()
                 / want_grads.get(n, zeros[n]).norm().clamp_min(1e-30)).item()
                for n in set(got_grads) | set(want_grads))
    return (got - want).abs().item(), worst, dsmoe_compiler.last_report()


def _lm_loss(ids):
    return lambda model: model(ids, labels=ids).loss


@pytest.mark.parametrize("arch,inner,options", [
    ("olmoe", "aot_eager", {}),
    ("qwen2_moe", "aot_eager", {}),  # gated shared expert folded into the operator
    ("deepseek_v3", "aot_eager", {}),  # grouped sigmoid routing, selection bias, scaling factor
    ("gpt_oss", "eager", {}),  # expert biases, clamped gate, top-k of the logits
    ("mixtral", "aot_eager", {"partition": 2}),  # sub-expert views
    ("qwen3_moe", "aot_eager", {"partition": 2, "transform": "complete"}),
    ("dbrx", "aot_eager", {}),  # down weights passed as a transposed view: its gradient keeps that layout
    ("llama4", "aot_eager", {}),  # the routing weight on the expert's input; a shared expert
    ("longcat_flash", "aot_eager", {}),  # zero-computation experts: a weight tensor with more experts than routed
])
def test_compiled_gradients_equal_eager(arch, inner, options):
    model = hf_model(arch, None if arch in ("dbrx", "llama4", "longcat_flash") else "grouped_mm").train()
    ids = random_ids(2, 11)
    loss_diff, worst, report = _compiled_against_eager(model, _lm_loss(ids), {"inner": inner, **options})
    assert len(report.rewritten) == moe_layer_count(model) and not report.left_alone
    assert report.counters["bind_gradients"] == 1  # the graph got the operator with a backward
    assert loss_diff < 1e-5
    assert worst < 1e-4, worst  # NaN fails too


@pytest.mark.parametrize("moe_cls", [ModuleListMoE, ThreeDMoE])
def test_user_moe_gradients_equal_eager(moe_cls):
    torch.manual_seed(0)
    model = UserBlockModel(moe_cls)
    x = torch.randn(2, 7, 32)
    loss_diff, worst, report = _compiled_against_eager(model, lambda m: m(x).square().mean(), {"inner": "aot_eager"})
    assert len(report.rewritten) == 2
    assert loss_diff < 1e-6 and worst < 1e-4, worst


def test_inference_graphs_keep_the_operator_without_autograd():
    model, ids = hf_model("olmoe"), random_ids(1, 7)
    compiled = torch.compile(model, backend="dualsparse", options={"inner": "eager"})
    with torch.no_grad():
        compiled(ids)
    assert "bind_gradients" not in dsmoe_compiler.last_report().counters
    with pytest.warns(UserWarning, match="compiled with gradients enabled"):
        compiled(ids)  # grad mode on: dynamo's guard recompiles, and this graph gets the backward
    report = dsmoe_compiler.last_report()
    assert report.graphs == 2 and report.counters["bind_gradients"] == 1


def test_capture_markers_backward_equals_transformers():
    """Route and experts as two marker ops (what a pair that stays unfused runs), called eagerly inside the capture
    context, against transformers' own modules."""
    from dsmoe_compiler.capture.transformers_hf import TransformersCapture

    model, ids = hf_model("qwen3_moe").train(), random_ids(2, 9)
    want, want_grads = _loss_and_grads(model, _lm_loss(ids))
    with TransformersCapture():
        got, got_grads = _loss_and_grads(model, _lm_loss(ids))
    assert set(got_grads) == set(want_grads)
    assert (got - want).abs().item() < 1e-5
    for name, g in want_grads.items():
        assert (got_grads[name] - g).norm() / g.norm() < 1e-4, name


def test_gradients_under_autocast():
    """Mixed-precision training (fp32 weights, ``torch.autocast`` bf16): every parameter's gradient is present and no
    farther from the fp32 model's than eager autocast's own (times 1.5), as the forward test asks of the logits."""
    model, ids = hf_model("olmoe").train(), random_ids(2, 9)

    def autocast_loss(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(ids, labels=ids).loss

    _, fp32 = _loss_and_grads(model, _lm_loss(ids))
    _, eager = _loss_and_grads(model, autocast_loss)
    compiled = torch.compile(model, backend="dualsparse", options={"inner": "aot_eager"})
    _, got = _loss_and_grads(compiled, autocast_loss)
    got = {name.removeprefix("_orig_mod."): g for name, g in got.items()}
    assert set(got) == set(eager) == set(fp32)
    assert len(dsmoe_compiler.last_report().rewritten) == moe_layer_count(model)
    for name, g in fp32.items():
        assert got[name].dtype == g.dtype and torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], g) < 1.5 * rel_err(eager[name], g) + 1e-6, name


# ---- the operator against finite differences ---------------------------------------------------------------
H, I, E, K, T = 8, 6, 4, 2, 5


def _block(partition=1, transform="partial", drop="none", shared=False, routing=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = ["router_weight", "gate_up", "down"] + (["shared_gate", "shared_up", "shared_down"] if shared else [])
    params = [torch.randn(E, H, generator=g), torch.randn(E, 2 * I, H, generator=g) * 0.4,
              torch.randn(E, H, I, generator=g) * 0.4]
    if shared:
        params += [torch.randn(3, H, generator=g) * 0.4, torch.randn(3, H, generator=g) * 0.4,
                   torch.randn(H, 3, generator=g) * 0.4]
    spec = MoESpec(name="blk", num_experts=E, top_k=K, hidden=H, intermediate=I, partition=partition, transform=transform,
                   routing=routing or RoutingSpec(), experts=ExpertsSpec(), slots=tuple(slots),
                   shared=SharedSpec(intermediate=3) if shared else None)
    if drop != "none":  # thresholds between the scores, so that some pairs drop and the rest stay
        key = state.register(spec.name, 0.35, 0.45, "cpu", False)
        spec = spec.replace(drop=DropSpec(mode=drop, key=key))
    x = torch.randn(T, H, generator=g)
    return x.double(), [p.double() for p in params], spec.to_json()


@pytest.mark.parametrize("case", [
    {}, {"routing": RoutingSpec(score_func="sigmoid", renormalize=True)}, {"shared": True},
    {"partition": 2}, {"partition": 2, "transform": "complete"}, {"drop": "1t"}, {"drop": "2t", "partition": 2},
])
def test_operator_backward_matches_finite_differences(case):
    x, params, spec = _block(**case)
    leaves = [t.requires_grad_() for t in (x, *params)]

    def op(x, *params):
        return torch.ops.dualsparse.moe_trainable(x, list(params), spec, "reference")

    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)
    state.clear()


@pytest.mark.parametrize("case", [{}, {"shared": True}, {"partition": 2}, {"partition": 2, "transform": "complete"}])
@pytest.mark.parametrize("dropped", [False, True])
def test_batched_experts_equal_the_loop(case, dropped):
    """The backward's batched recompute (``gradients.batched_experts``) against ``reference.experts``, forward."""
    from dsmoe_compiler.codegen import reference
    from dsmoe_compiler.codegen.reference import parse_spec
    from dsmoe_compiler.gradients import batched_experts

    x, params, spec_json = _block(**case, seed=5)
    spec = parse_spec(spec_json)
    _, weights, index = reference.route(x, params, spec)
    if spec.transform == "partial":
        index, weights = reference.partial_transform(index, weights, spec.partition)
    keep = torch.rand(index.shape, generator=torch.Generator().manual_seed(6)) > 0.4 if dropped else None
    want = reference.experts(x, index, weights, params, spec, keep)
    got = batched_experts(x, index, weights, params, spec, keep)
    assert rel_err(got, want) < 1e-12


def _experts_and_grads(fn, x, index, weights, params, spec, keep, grad):
    leaves = [t.detach().requires_grad_() for t in (x, weights, *params)]
    out = fn(leaves[0], index, leaves[1], leaves[2:], spec, keep)
    return out.detach(), torch.autograd.grad(out, leaves, grad, allow_unused=True)


def _drawn_routed_case(block, transform, seed, tokens, drop, widen=1):
    """A drawn block partitioned by P (``transform``; partial where scores come after top-k), its hidden size and
    neurons ``widen`` times the drawn ones, fp64 parameters and x, its routing (partial-transformed), a drop mask,
    and an output gradient: the arguments of ``reference.experts`` and ``_experts_and_grads``."""
    from dsmoe_compiler.codegen import reference
    from dsmoe_compiler.passes.partition import partition_spec

    spec, P = block
    if transform == "complete" and spec.routing.score_after_topk:
        transform = "partial"
    spec = partition_spec(spec.replace(hidden=widen * spec.hidden, intermediate=widen * spec.intermediate), P, transform)
    params = random_params(spec, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, spec.hidden, generator=g, dtype=torch.float64)
    _, weights, index = reference.route(x, params, spec)
    if spec.transform == "partial":
        index, weights = reference.partial_transform(index, weights, spec.partition)
    keep = torch.rand(index.shape, generator=g) > 0.3 if drop else None
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, index, weights, params, spec, keep, grad


def _assert_like_the_loop(got, got_grads, want, want_grads, tolerance, grad_tolerance):
    assert rel_err(got.double(), want) < tolerance or want.abs().max() == 0
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        if b is None or b.abs().max() == 0:  # the loop never touched it (an expert no kept pair reached): zero or
            assert a is None or a.abs().max() == 0, i  # absent here too
            continue
        assert a is not None and rel_err(a.double(), b) < grad_tolerance, (i, rel_err(a.double(), b))


@given(block=blocks(), transform=st.sampled_from(["partial", "complete"]), seed=st.integers(0, 2**31),
       tokens=st.sampled_from([1, 4, 9]), drop=st.booleans())
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_batched_experts_gradients_equal_the_loops(block, transform, seed, tokens, drop):
    """Every layout (fused, interleaved, transposed, separate, ModuleList, biases), P neuron groups under either
    transformation, dropped pairs: the batched recompute's output and its gradients for x, the routing weights and
    every parameter against the reference loop's, in fp64 (padded products: ``_grouped_mm`` takes no fp64). The
    weight gradients come from ``_SubExpertLinear`` and whole-tensor reshapes, not from autograd's own ``bmm`` and
    slices."""
    from dsmoe_compiler.codegen import reference
    from dsmoe_compiler.gradients import batched_experts

    case = _drawn_routed_case(block, transform, seed, tokens, drop)
    want, want_grads = _experts_and_grads(reference.experts, *case)
    got, got_grads = _experts_and_grads(batched_experts, *case)
    _assert_like_the_loop(got, got_grads, want, want_grads, 1e-12, 1e-10)


@given(block=blocks(), transform=st.sampled_from(["partial", "complete"]), seed=st.integers(0, 2**31),
       tokens=st.sampled_from([1, 4, 9]), drop=st.booleans())
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_grouped_recompute_gradients_equal_the_loops(block, transform, seed, tokens, drop):
    """The recompute on ``torch._grouped_mm`` (fp32, sizes it takes: hidden and neuron groups of multiples of 4):
    output and gradients for x, the routing weights and every parameter against the reference loop's in fp64, every
    layout, P neuron groups, dropped pairs, sub-experts without rows (ModuleList blocks stack their weights)."""
    from dsmoe_compiler import gradients
    from dsmoe_compiler.codegen import reference

    case = _drawn_routed_case(block, transform, seed, tokens, drop, widen=4)
    want, want_grads = _experts_and_grads(reference.experts, *case)
    x, index, weights, params, spec, keep, grad = case
    calls = []
    original = gradients._GroupedLinear.apply
    single = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradients._GroupedLinear, "apply", lambda *a: calls.append(1) or original(*a))
        got, got_grads = _experts_and_grads(gradients.batched_experts, single(x), index, single(weights),
                                            [single(p) for p in params], spec, keep, single(grad))
    assert calls, "the grouped products did not run"
    _assert_like_the_loop(got, got_grads, want, want_grads, 1e-5, 1e-5)


@pytest.mark.parametrize("column_major", [False, True])
def test_sub_expert_linear_gives_the_weights_layout(column_major):
    """``_SubExpertLinear``'s weight gradient: autograd's ``bmm`` values, laid out as the weight is (so that the
    parameter's gradient needs no strided copy: a transposed view's gradient transposed back is the stored layout)."""
    from dsmoe_compiler.gradients import _SubExpertLinear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    stored = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) if column_major else \
        torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    stored.requires_grad_()
    weight = stored.transpose(1, 2) if column_major else stored  # [S, out, in] either way
    grad = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(_SubExpertLinear.apply(x, weight), (x, weight), grad)
    want_x, want_w = torch.autograd.grad(torch.bmm(x, weight.transpose(1, 2)), (x, weight), grad)
    assert rel_err(gx, want_x) < 1e-14 and rel_err(gw, want_w) < 1e-14
    assert gw.stride() == weight.stride()


def test_ep_backward_is_the_blocks_and_refuses_a_load_aware_policy():
    """``ep_backward`` (the EP block's backward on a model that holds every expert) is the block's own backward on
    this rank's tokens; under a load-aware drop policy, whose kept pairs are not the block's thresholds', it raises,
    read per call (a policy set after compiling counts). The gloo runs: ``test_expert_parallel.py``."""
    from dsmoe_compiler.runtime import load_aware

    x, params, spec = _block(drop="1t")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    try:
        got = torch.ops.dualsparse.ep_backward(grad, x, params, spec)
        want = torch.ops.dualsparse.moe_backward(grad, x, params, spec)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and got[0].abs().max() > 0
        load_aware.set_policy("steep2")
        with pytest.raises(RuntimeError, match="load-aware drop policy"):
            torch.ops.dualsparse.ep_backward(grad, x, params, spec)
    finally:
        load_aware.clear()
        state.clear()
