"""Triton MoE kernels (codegen/dispatch.py) against the reference operator, on CPU under TRITON_INTERPRET=1.

Triton decides at decoration time whether a kernel is interpreted, so the interpreter must be on
before the kernel modules are imported, and switching it on inside the shared pytest process would
leak into other test files. This file therefore runs itself once in a subprocess with the variable
set; in the parent process only ``test_kernels_under_interpreter`` runs (it fails when any case fails).
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import fp32_matmul_precision, rel_err
from models import poisoned_empty, relayout

from dsmoe_compiler.codegen import INTERPRETED

pytest.importorskip("triton")


def run_under_interpreter(variant: str) -> None:
    """This file's kernel cases in a subprocess with Triton's interpreter on. Weight tiles through tensor descriptors
    (what Hopper runs) or plain pointer loads (older GPUs, interleaved or strided layouts), one program per tile:
    every case for the first, the weight-layout cases for the second; persistent programs walking several tiles each
    (schedule.py): the layout, partition, drop and empty-expert cases. The pointer and persistent runs are launched by
    ``test_kernels_variants.py``, so that pytest-xdist's ``--dist loadfile`` can give them to the other worker."""
    env = dict(os.environ, TRITON_INTERPRET="1", DSMOE_TMA="off" if variant == "pointers" else "auto",
               DSMOE_PERSISTENT="on" if variant == "persistent" else "off")
    # the pointer variant leaves out the property test of keep patterns (how weights load does not meet the keep mask);
    # both other variants run fp32 only (fp16 runs in the descriptor variant, and on the GPU through the persistent
    # tiles in test_gpu.py's fp16 tests): CI's 20 min on 2 cores
    select = {"descriptors": [], "pointers": ["-k", "((user_layouts or partition or basic or empty or without_a_gate) "
                                                   "and not any_keep_pattern) and not fp16"],
              "persistent": ["-k", "(user_layouts or partition or basic or empty or one_token or gptoss "
                                   "or (drop_mask and fp32) or without_a_gate) and not fp16"]}
    # the whole-suite run took the descriptor variant 528 s on 2 busy cores: 600 s would fail a slow machine spuriously
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__, *select[variant]],
                         env=env, capture_output=True, text=True, timeout=1000)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher")
def test_kernels_under_interpreter():
    run_under_interpreter("descriptors")


if INTERPRETED:
    from dsmoe_compiler.codegen import dispatch, reference
    from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec, SharedSpec

pytestmark_case = pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter subprocess")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if INTERPRETED:
        monkeypatch.setattr(dispatch, "_empty", poisoned_empty)


def make_case(dtype, *, T=12, H=32, I=48, E=4, K=2, P=1, transform="partial", routing=None, interleaved=False,
              transposed=False, bias=False, activation="silu", shared=None, router_bias=None, weight_on_input=False,
              seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    routing = routing or RoutingSpec()
    slots, params = ["router_weight", "gate_up", "down"], [rnd(E, H, scale=0.5)]
    gu_shape, dn_shape = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
    params += [rnd(*gu_shape, scale=H ** -0.5), rnd(*dn_shape, scale=I ** -0.5)]
    if bias:
        slots += ["gate_up_bias", "down_bias"]
        params += [rnd(E, 2 * I, scale=0.1), rnd(E, H, scale=0.1)]
    if routing.router_bias:
        slots.append("router_bias")
        params.append(router_bias.to(dtype) if router_bias is not None else rnd(E, scale=0.1))
    if routing.score_bias:
        slots.append("score_bias")
        params.append(rnd(E, scale=0.1).float())
    if shared is not None:
        slots += ["shared_gate", "shared_up", "shared_down"]
        params += [rnd(shared, H, scale=H ** -0.5), rnd(shared, H, scale=H ** -0.5), rnd(H, shared, scale=shared ** -0.5)]
    spec = MoESpec(name="moe", num_experts=E, top_k=K, hidden=H, intermediate=I, routing=routing,
                   experts=ExpertsSpec(interleaved=interleaved, transposed=transposed, has_bias=bias,
                                       activation=activation, weight_on_input=weight_on_input),
                   shared=SharedSpec(intermediate=shared) if shared is not None else None,
                   partition=P, transform=transform, slots=tuple(slots))
    return rnd(T, H), params, spec


def check(x, params, spec, keep=None, out=None):
    """``out`` (the kernels' output, computed here when None) against the fp64 reference."""
    if out is None:
        out = dispatch.moe_triton(x, params, spec, keep=keep)
    if keep is None:
        ref = reference.moe(x.double(), [p.double() for p in params], spec)
    else:  # the reference operator has no keep argument at block level: route, transform, experts(keep=)
        _, w, idx = reference.route(x, params, spec)
        idx, w = reference.partial_transform(idx, w, spec.partition)
        xd = x.double()
        ref = reference.experts(xd, idx, w.double(), [p.double() for p in params], spec, keep=keep)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    err = rel_err(out, ref)
    assert err < TOL[x.dtype], f"relative error {err:.2e}"


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def fp16_once(names: str, combos: list):
    """``parametrize("dtype, " + names)``: every combination in fp32, the first in fp16 as well. The 16-bit loads,
    casts and stores are the same code whatever flags these tests vary (layout, P, clamp, drop mode), so fp16 once
    per test keeps the interpreter's time for the flags (CI's 20 min on 2 cores); bf16 runs every layout on the GPU
    (test_gpu.py)."""
    name = lambda dtype, combo: "-".join([dtype, *map(str, combo)])  # noqa: E731
    params = [pytest.param(torch.float32, *c, id=name("fp32", c)) for c in combos]
    return pytest.mark.parametrize("dtype, " + names, params + [pytest.param(torch.float16, *combos[0],
                                                                            id=name("fp16", combos[0]))])


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_basic_softmax_top2(dtype):
    check(*make_case(dtype, seed=1))


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token(dtype):
    check(*make_case(dtype, T=1, E=8, K=2, seed=2))


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_tokens_on_one_expert_and_empty_experts(dtype):
    # a router bias of 20 on expert 2 makes every token pick it first; top-1: experts 0, 1, 3 stay empty
    bias = torch.tensor([0.0, 0.0, 20.0, 0.0])
    x, params, spec = make_case(dtype, T=40, K=1, routing=RoutingSpec(router_bias=True), router_bias=bias, seed=3)
    _, _, idx = reference.route(x, params, spec)
    assert (idx == 2).all()
    check(x, params, spec)


@pytestmark_case
@fp16_once("P", [(2,), (4,)])
def test_partition_sub_expert_views(dtype, P):
    routing = RoutingSpec(renormalize=True)
    check(*make_case(dtype, T=20, E=4, K=2, I=64, P=P, routing=routing, seed=4 + P))


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_partition_with_dropped_pairs(dtype):
    x, params, spec = make_case(dtype, T=24, E=4, K=2, I=64, P=2, seed=7)
    keep = torch.rand(24, 4, generator=torch.Generator().manual_seed(8)) > 0.4
    keep[0] = False  # one token with every pair dropped: its output must be exactly zero
    out = dispatch.moe_triton(x, params, spec, keep=keep)
    assert (out[0] == 0).all()
    check(x, params, spec, keep=keep)


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_partition_halves_kept_apart_with_biases(dtype):
    """P = 2 runs as one group per expert with nested halves (align.py): rows that kept the Major half only,
    both, or the Minor half only; the down bias belongs to the Major half, so a Minor-only row has none."""
    routing = RoutingSpec(score_after_topk=True, router_bias=True)
    x, params, spec = make_case(dtype, T=30, E=4, K=3, I=48, P=2, routing=routing, interleaved=True, transposed=True,
                                bias=True, activation="gptoss", seed=12)
    keep = torch.rand(30, 6, generator=torch.Generator().manual_seed(13)) > 0.35
    major, minor = keep[:, :3], keep[:, 3:]
    assert (major & ~minor).any() and (major & minor).any() and (~major & minor).any()
    check(x, params, spec, keep=keep)


@pytestmark_case
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 20), E=st.sampled_from([2, 3, 5]), K=st.integers(1, 3), data=st.data())
def test_partition_halves_any_keep_pattern(T, E, K, data):
    """Nested halves (P = 2) under any keep mask: experts with rows of one class only, none kept, all kept."""
    K = min(K, E)
    x, params, spec = make_case(torch.float32, T=T, E=E, K=K, I=32, P=2, seed=7 * T + E)
    bits = data.draw(st.lists(st.booleans(), min_size=2 * T * K, max_size=2 * T * K))
    keep = torch.tensor(bits).view(T, 2 * K)
    if keep.any():
        check(x, params, spec, keep=keep)
    else:  # nothing kept: exactly zero, not NaN from unwritten buffers
        assert (dispatch.moe_triton(x, params, spec, keep=keep) == 0).all()


@pytestmark_case
@fp16_once("transposed", [(True,), (False,)])
def test_gptoss_layout_interleaved_transposed_bias(dtype, transposed):
    """GPT-OSS's interleaved gate/up, read as one operand of paired rows (gate_up_glu._paired), in its own
    transposed layout and K-contiguous; I = 40 leaves the last column block partly past the neurons."""
    routing = RoutingSpec(score_after_topk=True, router_bias=True)
    check(*make_case(dtype, T=16, E=8, K=4, I=40, routing=routing, interleaved=True, transposed=transposed,
                     bias=True, activation="gptoss", seed=9))


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_scorebias_renorm_scale_shared(dtype):
    routing = RoutingSpec(score_func="sigmoid", renormalize=True, renorm_eps=1e-20, scale=2.5, score_bias=True)
    check(*make_case(dtype, T=10, E=8, K=3, routing=routing, shared=24, seed=10))


@pytestmark_case
def test_group_routing_complete_transform_and_gelu():
    # group-limited routing and the complete transformation go through reference.route
    routing = RoutingSpec(num_groups=2, topk_groups=1, renormalize=True)
    check(*make_case(torch.float32, T=9, E=8, K=2, P=2, I=32, transform="complete", routing=routing,
                     activation="gelu_tanh", seed=11))


@pytestmark_case
@pytest.mark.parametrize("softmax_in_logits_dtype", [False, True])
def test_route_kernel_matches_reference_indices(softmax_in_logits_dtype, monkeypatch):
    """In fp32 a softmax "in the logits' dtype" (DBRX, Mistral-4) is the kernel's own: the route kernel runs it.
    In fp16 that routing rounds its scores as the model does, and torch's ops route it."""
    routing = RoutingSpec(renormalize=True, softmax_in_logits_dtype=softmax_in_logits_dtype)
    x, params, spec = make_case(torch.float32, T=33, E=16, K=4, routing=routing, seed=12)
    _, w_ref, idx_ref = reference.route(x, params, spec)
    torch_routes = []
    monkeypatch.setattr(reference, "route", lambda *a: torch_routes.append(a) or (None, None, None))
    w, idx = dispatch.route(x, params, spec)
    assert not torch_routes, "an fp32 routing went through torch ops instead of the route kernel"
    assert torch.equal(idx.long(), idx_ref)
    torch.testing.assert_close(w, w_ref)
    assert dispatch._fused_routing_ok(spec, torch.float16) is not softmax_in_logits_dtype


@pytestmark_case
@fp16_once("P, routing", [
    (2, dict(renormalize=True)),  # the fused route kernel; nested halves
    (1, dict(score_func="sigmoid", score_after_topk=True, scores_fp32=True)),  # Llama-4's router (torch)
])
def test_weight_on_input_partition(dtype, P, routing):
    """Llama-4's experts see w x: the gate/up epilogue scales both products by the pair's weight before the
    activation and the down GEMM leaves its rows unscaled (a scale after the SwiGLU would differ: not homogeneous)."""
    routing = RoutingSpec(**routing)
    x, params, spec = make_case(dtype, T=21, E=8, K=2, P=P, I=32, routing=routing, transposed=True,
                                weight_on_input=True, seed=15)
    check(x, params, spec)
    if dtype == torch.float32:  # and it is not the usual operator: weighting the output instead is far off
        output_weighted = spec.replace(experts=dataclasses.replace(spec.experts, weight_on_input=False))
        ref = reference.moe(x.double(), [p.double() for p in params], output_weighted)
        out = dispatch.moe_triton(x, params, spec).double()
        assert rel_err(out, ref) > 1e-2


@pytestmark_case
@fp16_once("clamp, activation", [("before", "silu"), ("after", "silu"), ("before", "gelu_tanh"), ("softcap", "silu")])
def test_bounded_glu(dtype, clamp, activation):
    """A GLU clamped at limit (DeepSeek-V4, HY-V4: the gate before the activation; Step-3.7: after it; up to
    [-limit, limit] in both), or softcapped (Inkling-2: softcap(gate, gate_limit) * sigmoid(gate) * softcap(up, limit),
    softcap(v, c) = c tanh(v / c); the gate's cap travels in the kernel's alpha), in the gate/up epilogue. Limits and
    caps sit inside the products' range, and the bound is shown to matter: the unbounded operator is far off."""
    x, params, spec = make_case(dtype, T=19, E=4, K=2, P=2, activation=activation, seed=17)
    x = x * 4  # products of a few units: the limits below cut many of them
    spec = spec.replace(experts=dataclasses.replace(spec.experts, clamp=clamp, limit=0.75, gate_limit=0.6))
    check(x, params, spec)
    if dtype == torch.float32:
        unbounded = spec.replace(experts=dataclasses.replace(spec.experts, clamp="none"))
        ref = reference.moe(x.double(), [p.double() for p in params], unbounded)
        out = dispatch.moe_triton(x, params, spec).double()
        assert rel_err(out, ref) > 1e-2


@pytestmark_case
@fp16_once("P, transposed", [(2, False), (1, False), (1, True)])
def test_experts_without_a_gate(dtype, P, transposed):
    """NemotronH's experts, down(relu(up x)^2): one operand in the gate/up GEMM (``GATED`` off), separate 3-D up and
    down weights, sub-expert views of both for P = 2, either orientation."""
    x, params, spec = make_case(dtype, T=17, E=4, K=2, P=P, seed=23)
    g = torch.Generator().manual_seed(24)
    E, H, I = spec.num_experts, spec.hidden, spec.intermediate
    up, down = torch.randn(E, I, H, generator=g) * H ** -0.5, torch.randn(E, H, I, generator=g) * I ** -0.5
    if transposed:
        up, down = up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    experts = ExpertsSpec(layout="separate", gated=False, activation="relu2", transposed=transposed)
    spec = spec.replace(experts=experts, slots=("router_weight", "up", "down"))
    check(x, [params[0], up.to(dtype), down.to(dtype)], spec)


def given_routing_case(dtype, *, T=23, E=6, K=3, P=1, seed=21):
    """A block whose routing the graph computed: random distinct expert ids and positive weights per token as the
    first two slots (``RoutingSpec(score_func="given")``), int64 ids as transformers makes them."""
    x, params, spec = make_case(dtype, T=T, E=E, K=K, P=P, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    index = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :K]
    weights = torch.rand(T, K, generator=g).to(dtype) + 0.1
    spec = spec.replace(routing=RoutingSpec(score_func="given"), slots=("topk_index", "topk_weights") + spec.slots[1:])
    return x, [index, weights, *params[1:]], spec


@pytestmark_case
@fp16_once("P", [(2,), (1,)])
def test_given_routing(dtype, P):
    """The ids and weights the graph computed go straight to the grouping: no router here, and P = 2 (partial)
    remaps the given ids e -> 2e, 2e + 1."""
    x, params, spec = given_routing_case(dtype, P=P)
    check(x, params, spec)
    keep = torch.rand(x.shape[0], spec.top_k * P, generator=torch.Generator().manual_seed(3)) > 0.4
    check(x, params, spec, keep=keep)


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_given_ids_outside_the_experts_add_nothing(dtype):
    """A given id of E or -1 (a "no expert" sentinel) adds nothing, as transformers' loops skip it: the kernels
    equal the reference experts on the other pairs alone, and nothing indexes past the experts (outputs finite).
    Without ``absent_ids`` such a pair is computed as expert 0 at weight 0 (the next test: with it, not at all)."""
    x, params, spec = given_routing_case(dtype)
    index = params[0].clone()
    index[::3, 0] = spec.num_experts
    index[1::4, -1] = -1
    out = dispatch.moe_triton(x, [index, *params[1:]], spec)
    assert torch.isfinite(out).all()
    others = (index >= 0) & (index < spec.num_experts)
    ref = reference.experts(x.double(), index.clamp(0, spec.num_experts - 1), params[1].double(),
                            [p.double() for p in params], spec, keep=others)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_absent_pairs_are_not_grouped_nor_counted(dtype, monkeypatch):
    """A given id outside the experts is an absent pair (``reference.present_pairs``; LongCat-Flash's zero-computation
    experts): the grouping leaves it out (the grouped GEMMs see only the other pairs' rows, not a row of expert 0 at
    weight 0), and the drop statistics count it neither kept nor dropped, in the kernels as in the reference."""
    from dsmoe_compiler.codegen import launch
    from dsmoe_compiler.ir import DropSpec

    x, params, spec = given_routing_case(dtype)
    spec = spec.replace(routing=RoutingSpec(score_func="given", absent_ids=True))
    index = params[0].clone()
    index[::3, 0] = spec.num_experts
    index[1::4, -1] = -1
    params = [index, *params[1:]]
    present = (index >= 0) & (index < spec.num_experts)
    grouped = []
    original = launch.Kernel.launch

    def spy(self, ptrs, record):
        original(self, ptrs, record)
        if self.kernel is dispatch.gate_up_glu_kernel:  # (x, w, u, bias, h, sorted ids, counts, weights)
            grouped.append(int(ptrs[6].sum()))

    monkeypatch.setattr(launch.Kernel, "launch", spy)
    check(x, params, spec)
    assert grouped == [int(present.sum())] and int(present.sum()) < index.numel()
    spec = spec.replace(drop=DropSpec(mode="1t", key="absent"))
    thresholds = torch.tensor([0.2, 0.2])
    stats, ref_stats = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    out = dispatch.moe_triton(x, params, spec, thresholds=thresholds, stats=stats)
    ref = reference.moe(x.double(), [p.double() for p in params], spec, thresholds, ref_stats)
    assert rel_err(out, ref) < TOL[dtype]
    torch.testing.assert_close(stats, ref_stats, rtol=0, atol=0)
    assert stats[1].item() == present.sum().item() * spec.intermediate  # no shared experts: the present pairs
    assert 0 < stats[0].item() < stats[1].item()


@pytestmark_case
def test_route_kernel_sigmoid_in_fp32_and_clamped_renorm():
    """fp16 logits. scores_fp32 (MiniMax-M2): the kernel keeps its fp32 sigmoid unrounded, like the reference
    (rounding it to fp16 is off by up to 5e-4). renorm_min (Ernie-4.5, binding on some tokens) and expert_scale
    (Gemma-4) in the same kernel; the whole block matches."""
    routing = RoutingSpec(score_func="sigmoid", renormalize=True, score_bias=True, scores_fp32=True, weights_fp32=True)
    x, params, spec = make_case(torch.float16, T=33, E=16, K=4, routing=routing, seed=13)
    w, idx = dispatch.route(x, params, spec)
    _, w_ref, idx_ref = reference.route(x, params, spec)
    assert torch.equal(idx.long(), idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    for expert_scale in (False, True):
        clamped = RoutingSpec(renormalize=True, score_bias=True, renorm_min=0.99, logits_fp32=True, weights_fp32=True,
                              expert_scale=expert_scale)
        x, params, spec = make_case(torch.float16, T=20, E=8, K=2, routing=clamped, seed=14)
        if expert_scale:
            spec = spec.replace(slots=spec.slots + ("expert_scale",))
            params = params + [1 + 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(3))]
        _, w_ref, idx_ref = reference.route(x, params, spec)
        unscaled = w_ref if not expert_scale else w_ref / params[-1][idx_ref]
        assert (unscaled.float().sum(dim=-1) < 0.98).sum() >= 5  # the clamp binds on these tokens
        w, idx = dispatch.route(x, params, spec)
        assert torch.equal(idx.long(), idx_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
        check(x, params, spec)


@pytestmark_case
@fp16_once("mode, P, thr", [("2t", 2, (0.3, 0.45)), ("1t", 1, (0.3, 0.0)), ("skip", 2, (0.6, 0.0)),
                            ("topk", 1, (0.0, 0.0))])
def test_drop_mask_and_stats_fused_into_routing(mode, P, thr, dtype):
    """With thresholds, the route kernel writes reference.keep_mask's pairs and reference.record_drops' stats."""
    from dsmoe_compiler.ir import DropSpec

    x, params, spec = make_case(dtype, T=70, E=8, K=3, I=64, P=P, routing=RoutingSpec(renormalize=mode == "1t"),
                                seed=13)
    spec = spec.replace(drop=DropSpec(mode=mode))
    thresholds = torch.tensor(thr, dtype=torch.float32)
    _, w, _ = reference.route(x, params, spec)
    keep = reference.keep_mask(w, spec, thresholds)
    assert 0 < (~keep).sum() < keep.numel()
    stats, ref_stats = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    reference.record_drops(ref_stats, keep, spec)
    out = dispatch.moe_triton(x, params, spec, thresholds=thresholds, stats=stats)
    torch.testing.assert_close(stats, ref_stats, rtol=0, atol=0)
    expected = dispatch.moe_triton(x, params, spec.replace(drop=DropSpec()), keep=keep)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    check(x, params, spec.replace(drop=DropSpec()), keep=keep, out=expected)


@pytestmark_case
def test_plan_reused_across_calls_and_token_counts():
    """Second call of a plan (recorded kernels) and a new token count give the reference answer."""
    x, params, spec = make_case(torch.float32, T=20, E=4, K=2, I=64, P=2, seed=14)
    for T in (20, 20, 7, 20):
        check(x[:T].clone(), params, spec)


@pytestmark_case
def test_fp32_products_follow_torchs_tf32_setting():
    """The GEMMs' ``tl.dot`` precision comes from torch's fp32 matmul setting at the call (``dispatch.dot_precision``;
    the interpreter multiplies in fp32 either way, the GPU test checks the numbers): a changed setting builds a plan
    of its own, 16-bit inputs keep theirs."""
    x, params, spec = make_case(torch.float32, T=9, seed=41)
    for setting, want in (("ieee", "tf32x3"), ("tf32", "tf32"), ("ieee", "tf32x3")):
        with fp32_matmul_precision(setting):
            check(x, params, spec)
        plan = next(p for key, p in dispatch._PLANS.items() if key[0] == id(spec) and key[-1] == want)
        assert {plan.gate_up.constexprs["DOT_PRECISION"], plan.down.constexprs["DOT_PRECISION"]} == {want}
    assert dispatch.dot_precision(torch.float16) == dispatch.dot_precision(torch.bfloat16) == "tf32"


@pytestmark_case
def test_fp64_runs_the_reference():
    """fp64 inputs (no tile or product of the kernels is meant for them) take the reference, bit for bit, and build
    no plan."""
    x, params, spec = make_case(torch.float64, T=9, seed=43)
    plans = len(dispatch._PLANS)
    assert torch.equal(dispatch.moe_triton(x, params, spec), reference.moe(x, params, spec))
    assert len(dispatch._PLANS) == plans


@pytestmark_case
@fp16_once("P", [(2,), (1,)])
def test_labelled_rows_match_the_reference_per_row(dtype, P):
    """Expert parallelism's local step: rows that name their sub-expert (complete transform, one pair a row).
    Two row counts under one capacity (the plan is reused, its extra rows masked), sub-experts left empty."""
    x, params, spec = make_case(dtype, T=50, E=4, K=2, I=64, P=P, transform="complete", seed=30 + P)
    spec = dataclasses.replace(spec, top_k=1)
    g = torch.Generator().manual_seed(P)
    subs = 4 * P
    for n in (50, 37):
        sub = torch.randint(0, subs - 1, (n,), generator=g)  # the last sub-expert gets no row
        y = dispatch.labelled_rows(x[:n].clone(), sub, params, spec)
        assert y.shape == (n, spec.hidden) and torch.isfinite(y).all(), "unwritten (NaN) row"
        xd, pd = x[:n].double(), [p.double() for p in params]
        ref = torch.empty_like(xd)
        for i in range(n):
            gate, up, down, gb, ub, db = reference.sub_expert_weights(pd, spec, int(sub[i]))
            h = reference.expert_glu(xd[i:i + 1] @ gate.t(), xd[i:i + 1] @ up.t(), spec.experts)
            ref[i] = (h @ down.t())[0]
        err = rel_err(y, ref)
        assert err < TOL[dtype], f"n={n}: relative error {err:.2e}"


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_labelled_rows_with_neuron_halves(dtype):
    """EP's nested units (P = 2 partial): each row names an expert and the halves it keeps (Major only, both,
    Minor only); its output sums those halves' sub-experts. Against fp64, two row counts under one capacity."""
    x, params, spec = make_case(dtype, T=60, E=4, K=2, I=64, P=2, transform="partial", seed=41)
    spec = dataclasses.replace(spec, top_k=1)
    g = torch.Generator().manual_seed(5)
    for n in (60, 33):
        expert = torch.randint(0, 3, (n,), generator=g)  # expert 3 gets no row
        cls = torch.randint(0, 3, (n,), generator=g)
        halves = torch.stack([cls != 2, cls != 0], dim=1)
        y = dispatch.labelled_rows(x[:n].clone(), expert, params, spec, halves)
        assert y.shape == (n, spec.hidden) and torch.isfinite(y).all(), "unwritten (NaN) row"
        xd, pd = x[:n].double(), [p.double() for p in params]
        ref = torch.zeros_like(xd)
        for i in range(n):
            for half in (0, 1):
                if halves[i, half]:
                    gate, up, down, gb, ub, db = reference.sub_expert_weights(pd, spec, int(expert[i]) * 2 + half)
                    h = reference.expert_glu(xd[i:i + 1] @ gate.t(), xd[i:i + 1] @ up.t(), spec.experts)
                    ref[i] += (h @ down.t())[0]
        err = rel_err(y, ref)
        assert err < TOL[dtype], f"n={n}: relative error {err:.2e}"


@pytestmark_case
def test_plan_refuses_int64_expert_ids():
    """int64 ids through the count kernel failed to compile on Triton 3.6: a clear error instead."""
    x, params, spec = make_case(torch.float32, T=8, E=4, K=2, seed=43)
    plan = dispatch._Plan(spec, 8, x.dtype, x.device, 2, fused_route=False, keep_given=False, drop_on=False,
                          stats_on=False)
    _, w, idx = reference.route(x, params, spec)
    with pytest.raises(TypeError, match="int32"):
        plan(x, params, weights=w.contiguous(), index=idx.contiguous())
    assert torch.isfinite(plan(x, params, weights=w.contiguous(), index=idx.to(torch.int32))).all()


@pytestmark_case
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_combine_weights_and_skips_dropped_rows(dtype):
    """EP combine: out[t] = sum_j w[t, j] * src[rows[t, j]], rows -1 dropped (a token with every pair dropped
    gets zeros); against fp64, into a NaN-poisoned buffer."""
    from dsmoe_compiler.codegen.gather_combine import gather_combine, gather_combine_reference

    g = torch.Generator().manual_seed(7)
    T, K, H, N = 9, 3, 40, 20
    src = torch.randn(N, H, generator=g).to(dtype)
    rows = torch.randint(0, N, (T, K), generator=g, dtype=torch.int32)
    rows[torch.rand(T, K, generator=g) < 0.3] = -1
    rows[4] = -1
    w = torch.rand(T, K, generator=g)
    out = torch.full((T, H), float("nan"), dtype=dtype)
    got = gather_combine(src, rows, w, out=out)
    ref = sum(torch.where(rows[:, j, None] >= 0, src.double()[rows[:, j].long().clamp(min=0)], 0.0)
              * w[:, j, None].double() for j in range(K))
    assert torch.isfinite(got).all() and (got[4] == 0).all()
    for name, val in (("kernel", got), ("torch", gather_combine_reference(src, rows, w))):
        err = rel_err(val, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e}"


@pytestmark_case
@fp16_once("layout, P", [("list", 2)] + [(layout, P) for layout in ("separate", "separate-transposed", "list")
                                             for P in (1, 2) if (layout, P) != ("list", 2)] + [("dbrx", 2)])
def test_user_layouts_separate_and_list(dtype, layout, P):
    """User MoEs: 3-D gate/up/down tensors (either orientation) and ModuleList experts (address tables); DBRX's down
    weights as a transposed view, which the down GEMM reads through the descriptor of the transposed layout."""
    x, params, spec = make_case(dtype, T=30, E=6, K=2, I=64, P=P, seed=20 + P)
    params, spec = relayout(params, spec, layout.split("-")[0], transposed=layout.endswith("transposed"))
    assert dispatch.kernels_cover(spec, params)
    if layout == "dbrx":
        assert not params[-1].is_contiguous() and dispatch._Weights(spec, params).n_major_fit() == (False, True)
    check(x, params, spec)
    if P == 2:
        keep = torch.rand(30, 4, generator=torch.Generator().manual_seed(21)) > 0.3
        check(x, params, spec, keep=keep)


@pytestmark_case
def test_list_layout_with_unlike_experts_runs_the_reference():
    x, params, spec = make_case(torch.float32, T=10, E=4, K=2, seed=22)
    params, spec = relayout(params, spec, "list")
    i = spec.slots.index("gate.3")
    params[i] = params[i].t().contiguous().t()  # same values, other strides
    assert not dispatch.kernels_cover(spec, params)
    check(x, params, spec)


# ---- whole compiled models through the kernels (kernels="triton" runs them on CPU under the interpreter) ----
@pytestmark_case
@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])  # Mixtral routes as Qwen3-MoE
def test_compiled_transformers_model_through_the_kernels(arch):
    from models import VOCAB, hf_model

    model = hf_model(arch)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        dispatch._PLANS.clear()
        torch._dynamo.reset()
        got = torch.compile(model, backend="dualsparse", options={"kernels": "triton", "inner": "eager"})(ids).logits
    assert len(dispatch._PLANS) > 0, "the reference ran instead of the kernels"
    assert torch.isfinite(got).all()
    err = rel_err(got, want)
    assert err < 1e-5, f"relative error {err:.2e}"


@pytestmark_case
@pytest.mark.parametrize("inner", ["aot_eager"])  # AOT autograd, as inductor runs it; eager: test_gradients.py
def test_gradients_of_a_model_on_the_kernels(inner):
    """Grad mode on: the forward through the kernels, the backward rerunning the reference (gradients.py); every
    parameter's gradient against eager transformers'."""
    from models import VOCAB, hf_model

    model = hf_model("qwen2_moe").train()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    dispatch._PLANS.clear()
    torch._dynamo.reset()
    torch.compile(model, backend="dualsparse", options={"kernels": "triton", "inner": inner})(ids, labels=ids).loss.backward()
    assert len(dispatch._PLANS) > 0, "the reference ran instead of the kernels"
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        err = rel_err(p.grad, want[name])
        assert err < 1e-4, f"{name}: relative error {err:.2e}"  # NaN fails too


@pytestmark_case
@pytest.mark.parametrize("mode", ["2t"])  # 1T's keep mask: test_drop_mask_and_stats_fused_into_routing
def test_compiled_model_drops_the_same_pairs_through_the_kernels(mode):
    from conftest import drop_runs
    from models import VOCAB, hf_model

    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    outs = drop_runs(hf_model("olmoe"), ids, mode, threshold=0.49)  # top-2 of 8: about half the pairs
    assert outs["triton_rate"] == outs["reference_rate"] > 0
    err = rel_err(outs["triton"], outs["reference"])
    assert err < 1e-5, f"relative error {err:.2e}"


# ---- the alignment kernels alone (align.py) ----
@pytestmark_case
@pytest.mark.parametrize("T,K,E,P,nested,with_keep", [(100, 8, 64, 1, False, False), (150, 2, 64, 2, False, True),
                                                       (1, 1, 1, 1, False, False), (70, 4, 300, 1, False, True),
                                                       (200, 2, 8, 2, True, True), (100, 2, 90, 2, True, True)])
def test_align_counts_ranks_and_sorted_ids(T, K, E, P, nested, with_keep):
    """Several programs and one crowded group: counts = kept pairs per group (E * P sub-experts, or the 3 * E
    nested counters), each group's ranks are exactly 0..count - 1 (block ranks + one atomic per program and
    group up to 256 groups, one atomic per pair above: E = 300, 3 * 90), and its slots of sorted hold its pairs."""
    import triton

    from dsmoe_compiler.codegen import align

    g = torch.Generator().manual_seed(T * E)
    index = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    index[: T // 2, 0] = E - 1
    cols = 2 * K if nested else K * P
    keep = torch.randint(0, 2, (T, cols), generator=g, dtype=torch.uint8) if with_keep else None
    kept = keep != 0 if with_keep else torch.ones(T, cols, dtype=torch.bool)
    if nested:  # one row per (token, slot): counter = class * E + expert, class 0 Major only, 1 both, 2 Minor only
        major, minor = kept[:, :K], kept[:, K:]
        cls = torch.where(major & minor, 1, torch.where(major, 0, 2))
        group = torch.where(major | minor, cls * E + index, -1).flatten()
    else:
        col = torch.arange(cols)
        group = torch.where(kept, index[:, col % K] * P + col // K, -1).flatten()
    n, groups = group.numel(), 3 * E if nested else E * P
    counts = torch.zeros(groups, dtype=torch.int32)
    rank, sorted_ids = torch.full((n,), -1, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32)
    grid, keep_arg = (triton.cdiv(n, dispatch.BLOCK_PAIRS),), keep if with_keep else index
    meta = dict(HAS_KEEP=with_keep, BLOCK_PAIRS=dispatch.BLOCK_PAIRS)
    if nested:
        align.count_nested_kernel[grid](index, keep_arg, counts, rank, n, E, K, groups,
                                        BLOCK_SUBS=triton.next_power_of_2(groups), **meta)
        align.scatter_nested_kernel[grid](index, keep_arg, counts, rank, sorted_ids, n, E, K,
                                          BLOCK_SUBS=triton.next_power_of_2(E), **meta)
        c = counts.long().view(3, E)  # rows of expert e: [A | B | C] from the exclusive cumsum of the totals
        start = (c.sum(0).cumsum(0) - c.sum(0) + torch.stack([torch.zeros_like(c[0]), c[0], c[0] + c[1]])).flatten()
    else:
        args = (n, K, cols, P, groups)
        align.count_kernel[grid](index, keep_arg, counts, rank, *args, BLOCK_SUBS=triton.next_power_of_2(groups), **meta)
        align.scatter_kernel[grid](index, keep_arg, counts, rank, sorted_ids, *args,
                                   BLOCK_SUBS=triton.next_power_of_2(groups), **meta)
        start = counts.long().cumsum(0) - counts.long()
    assert counts.tolist() == torch.bincount(group[group >= 0], minlength=groups).tolist()
    for s in range(groups):
        members = (group == s).nonzero().flatten()
        assert sorted(rank[members].tolist()) == list(range(len(members))), f"ranks of group {s}"
        assert sorted(sorted_ids[start[s]:start[s] + len(members)].tolist()) == members.tolist(), f"rows of group {s}"


@pytestmark_case
@pytest.mark.parametrize("T,width,groups,dead", [(100, 8, 64, 0.0), (150, 4, 192, 0.3), (1, 1, 1, 0.0), (90, 6, 384, 0.5)])
def test_group_rows_puts_entries_in_group_order(T, width, groups, dead):
    """EP's send order (``dispatch.group_rows``): rows grouped by the group each entry names (-1: not sent),
    counts per group, each entry's row and each row's token. Block-local ranks up to 256 groups, one atomic per
    entry above (384); a crowded group; outputs poisoned (-1) first."""
    g = torch.Generator().manual_seed(T + groups)
    group = torch.randint(0, groups, (T, width), generator=g, dtype=torch.int32)
    group[: T // 2, 0] = groups - 1
    group[torch.rand(T, width, generator=g) < dead] = -1
    token, counts, row = dispatch.group_rows(group.long(), groups)  # any integer dtype in; int32 in the kernels
    live = group >= 0
    assert counts.tolist() == torch.bincount(group[live].long(), minlength=groups).tolist()
    assert (row[~live] == -1).all() and (row[live] >= 0).all()
    n = int(live.sum())
    assert sorted(row[live].tolist()) == list(range(n)), "rows of the sent entries are not 0..n-1 exactly once"
    tokens = torch.arange(T)[:, None].expand(T, width)
    assert (token[row[live].long()] == tokens[live]).all(), "a row's token is not its entry's token"
    order = torch.full((n,), -1, dtype=torch.long)
    order[row[live].long()] = group[live].long()
    assert (order[1:] >= order[:-1]).all(), "rows are not in group order"


@pytestmark_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,groups,sent,bound", [(50, 48, 7, 130, 200), (9, 1000, 384, 0, 36), (30, 64, 5, 120, 120)])
def test_gather_rows_copies_the_sent_rows_only(dtype, T, H, groups, sent, bound):
    """EP's send buffer (``gather_rows``): rows r < n = sum(counts) (read by the kernel on the device) hold
    x[token[r]] exactly; rows n.. of the NaN-poisoned buffer are left alone, even where token has junk there.
    Some rows sent, none, every row of the buffer; H over and under the column block."""
    from dsmoe_compiler.codegen.gather_rows import gather_rows, gather_rows_reference

    g = torch.Generator().manual_seed(T + H + sent)
    x = torch.randn(T, H, generator=g).to(dtype)
    counts = torch.zeros(groups, dtype=torch.int32)
    counts.index_add_(0, torch.randint(0, groups, (sent,), generator=g), torch.ones(sent, dtype=torch.int32))
    token = torch.randint(0, T, (bound,), generator=g, dtype=torch.int32)
    token[sent:] = 1 << 30  # junk past the sent rows: reading it would fault or fill rows
    out = torch.full((bound, H), float("nan"), dtype=dtype)
    send = gather_rows(x, token, counts, bound, out=out)
    assert send.data_ptr() == out.data_ptr()
    assert torch.equal(send[:sent], gather_rows_reference(x, token, counts))
    assert send[sent:].isnan().all(), "rows past the sent ones were written"


@pytestmark_case
@pytest.mark.parametrize("nested,split,drop", [(False, False, False), (False, False, True), (True, False, False),
                                               (True, True, False), (True, True, True)])
def test_ep_send_order_fused_matches_torch(nested, split, drop):
    """``ep._send_order`` through the kernels against its torch ops (sort, scatter, gather); ``ep_checks.py``
    says what must agree. P = 2 partial under nesting, a rank boundary inside an expert (split), dropped halves."""
    from ep_checks import check_send_order, send_order_case

    check_send_order(*send_order_case(T=40, K=4, E=6, H=16, nested=nested, split=split, drop=drop, device="cpu"))


@pytestmark_case
@pytest.mark.parametrize("nested", [False, True])
def test_received_rows_kernel_labels_like_torch(nested):
    """Labels of an EP rank's received rows from every source's counts per group (empty segments, one source
    with nothing): the kernel's [index, keep] equal ``received_rows_reference``, rows past n kept by nothing."""
    import triton

    from dsmoe_compiler.codegen.received_rows import received_rows_kernel, received_rows_reference

    g = torch.Generator().manual_seed(11 + nested)
    world, groups, lo, hi, offset = 3, 24, 9, 18, 2
    counts = torch.randint(0, 6, (world, groups), generator=g)
    counts[:, lo + 1] = 0
    counts[1] = 0
    n, cap = int(counts[:, lo:hi].sum()), 128
    slots = 2 if nested else 1
    index = torch.full((cap, 1), -1, dtype=torch.int32)
    keep = torch.full((cap, slots), 7, dtype=torch.uint8)
    received_rows_kernel[(triton.cdiv(cap, 32),)](counts, index, keep, cap, counts.stride(0), lo, hi - lo,
                                                  world * (hi - lo), offset, NESTED=nested, BLOCK_ROWS=32,
                                                  BLOCK_L=triton.next_power_of_2(world * (hi - lo)))
    label, halves = received_rows_reference(counts, lo, hi, n, nested, offset)
    assert index[:n, 0].tolist() == label.tolist()
    assert keep[:n].bool().tolist() == halves.tolist() and (keep[n:] == 0).all()


@pytestmark_case
@pytest.mark.parametrize("nested", [False, True])
def test_ep_local_step_through_the_kernels_matches_the_loop(nested):
    """EP's local step, impl "triton" (labels by the kernel, then the labelled-rows plan) against the torch loop,
    on a rank holding experts 4..7 of 8 as a sharded model does, P = 2 (rows per sub-expert, or nested units)."""
    from dsmoe_compiler.ir import ExpertsSpec
    from dsmoe_compiler.runtime import ep

    g = torch.Generator().manual_seed(1)
    spec = MoESpec(name="chk", num_experts=8, top_k=2, hidden=64, intermediate=64, partition=2,
                   experts=ExpertsSpec(expert_offset=4, local_experts=4), slots=("router_weight", "gate_up", "down"))
    params = [torch.randn(8, 64, generator=g) * 0.1, torch.randn(4, 128, 64, generator=g) * 0.1,
              torch.randn(4, 64, 64, generator=g) * 0.1]
    e = ep.EPSpec(group="", rank=1, world=2, ranges=(0, 8, 16), key="", nested=nested)
    lo, hi = e.group_ranges[1:]
    counts = torch.randint(0, 5, (2, e.groups), generator=g)
    counts[:, lo] = 0
    recv = torch.randn(int(counts[:, lo:hi].sum()), 64, generator=g)
    got = ep.local_experts(recv, counts, params, spec.to_json(), e.to_json(), "triton")
    want = ep.local_experts(recv.double(), counts, [p.double() for p in params], spec.to_json(), e.to_json(), "reference")
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5
    # fp64 rows take the torch loop under impl "triton" too (as moe_triton does), bit for bit
    got64 = ep.local_experts(recv.double(), counts, [p.double() for p in params], spec.to_json(), e.to_json(), "triton")
    assert torch.equal(got64, want)


@pytestmark_case
@pytest.mark.parametrize("mode,P", [("2t", 2), ("1t", 1), ("1t", 2)])
def test_ep_route_drops_in_the_route_kernel_like_torch(mode, P):
    """EP's routing with uniform thresholds and impl "triton": keep mask, statistics, ids and weights as the torch
    route with ``keep_per_destination`` and ``record_drops`` (``ep_checks.check_route_and_drop``)."""
    from ep_checks import check_route_and_drop

    x, params, spec = make_case(torch.float32, T=50, E=8, K=3, I=64, P=P, seed=17)
    check_route_and_drop(x, params, spec, mode)


@pytestmark_case
@pytest.mark.parametrize("mode,P", [("2t", 2), ("1t", 1), ("1t", 2), ("skip", 2), ("topk", 1)])
def test_keep_per_destination_kernel_matches_torch(mode, P):
    """EP with a load-aware policy: the keep-per-destination kernel against the torch rule (``ep_checks``)."""
    from ep_checks import check_keep_per_destination

    check_keep_per_destination(mode, P, "cpu")


@pytestmark_case
def test_load_policy_kernels_match_the_torch_policies():
    """Load-aware EP's two launches (pairs per destination; a built-in policy's thresholds per rank) against
    ``ep._loads_to`` and ``load_aware``'s policies (``ep_checks.check_load_policy``)."""
    from ep_checks import check_load_policy

    check_load_policy("cpu")


@pytestmark_case
@pytest.mark.parametrize("world,groups", [(1, 5), (2, 16), (3, 7), (5, 300), (4, 3)])
def test_exchange_sizes_kernel_matches_torch(world, groups):
    """EP's exchange sizes ([send | recv] rows of each rank) from every rank's rows per group, one launch against
    ``exchange_sizes_reference``: uneven rank boundaries, ranks holding no group, more groups than a block,
    zero counts; the output poisoned (-1) first."""
    from dsmoe_compiler.codegen.exchange_sizes import exchange_sizes, exchange_sizes_reference
    from dsmoe_compiler.runtime import ep

    g = torch.Generator().manual_seed(world * 1000 + groups)
    counts = torch.randint(0, 50, (world, groups), generator=g)
    counts[:, 0] = 0
    cuts = sorted(torch.randint(0, groups + 1, (world - 1,), generator=g).tolist())
    bounds = (0, *cuts, groups)
    for rank in range(world):
        want = exchange_sizes_reference(counts, bounds, rank)
        got = exchange_sizes(counts, ep._rank_of(bounds, "cpu"), rank, out=torch.full((2 * world,), -1))
        assert torch.equal(got, want), f"rank {rank} bounds {bounds}: {got.tolist()} != {want.tolist()}"
        assert int(got[:world].sum()) == int(counts[rank].sum())


if INTERPRETED:
    import triton
    import triton.language as tl

    @triton.jit
    def _xor_and_sort_kernel(x_ptr, rows_ptr, all_ptr, sorted_ptr, R: tl.constexpr, C: tl.constexpr):
        offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        x = tl.load(x_ptr + offs)
        tl.store(rows_ptr + tl.arange(0, R), tl.xor_sum(x, 1))
        tl.store(all_ptr, tl.xor_sum(tl.xor_sum(x, 0), 0))
        tl.store(sorted_ptr + offs, tl.sort(x, 1))


@pytestmark_case
def test_interpreter_patch_is_installed_and_exact():
    """tests/interpreter_patch.py is on in this subprocess (else the kernel cases run at the interpreter's own speed,
    about twice the time), and the numpy xor reduction it gives ``tl.xor_sum`` (and through it ``tl.sort``'s bitonic
    network) equals Python's xor and torch's sort on random 32-bit integers."""
    import functools
    import operator

    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "_dualsparse_wrapped", False), "interpreter_patch.install() found " \
        "Triton's interpreter internals changed: update tests/interpreter_patch.py"
    x = torch.randint(-2**31, 2**31 - 1, (8, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    rows, total, ordered = torch.full((8,), -1, dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32), \
        torch.full_like(x, -1)
    _xor_and_sort_kernel[(1,)](x, rows, total, ordered, R=8, C=32)
    assert rows.tolist() == [functools.reduce(operator.xor, r) for r in x.tolist()]
    assert total.item() == functools.reduce(operator.xor, x.flatten().tolist())
    assert torch.equal(ordered, x.sort(dim=1).values)
