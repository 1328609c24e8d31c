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
from models import ModuleListMoE, ThreeDMoE, UserBlockModel, hf_model, moe_layer_count, random_ids

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
