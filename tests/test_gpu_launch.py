"""GPU only: the recorded-kernel replay of codegen/dispatch.py (later calls of a plan) gives what the first
call (Triton's own launch path) gives, bit for bit, also inside a CUDA graph, with and without dropping."""

import pytest
import torch
from conftest import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")

if torch.cuda.is_available():
    from dsmoe_compiler.codegen import dispatch, reference
    from dsmoe_compiler.ir import DropSpec, ExpertsSpec, MoESpec, RoutingSpec, SharedSpec


def make(T, *, E=16, K=4, H=256, I=128, P=1, drop="none", routing=None, bias=False, interleaved=False,
         transposed=False, activation="silu", shared=None, dtype=torch.bfloat16, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)  # noqa: E731
    slots = ["router_weight", "gate_up", "down"]
    params = [rnd(E, H, scale=0.1), rnd(*((E, H, 2 * I) if transposed else (E, 2 * I, H)), scale=H ** -0.5),
              rnd(*((E, I, H) if transposed else (E, H, I)), scale=I ** -0.5)]
    if bias:
        slots += ["gate_up_bias", "down_bias"]
        params += [rnd(E, 2 * I, scale=0.1), rnd(E, H, scale=0.1)]
    if routing is not None and routing.router_bias:
        slots.append("router_bias")
        params.append(rnd(E, scale=0.1))
    if shared:
        slots += ["shared_gate", "shared_up", "shared_down"]
        params += [rnd(shared, H, scale=H ** -0.5), rnd(shared, H, scale=H ** -0.5), rnd(H, shared, scale=shared ** -0.5)]
    spec = MoESpec(name=f"gpu{seed}", num_experts=E, top_k=K, hidden=H, intermediate=I,
                   routing=routing or RoutingSpec(), partition=P, drop=DropSpec(mode=drop),
                   experts=ExpertsSpec(interleaved=interleaved, transposed=transposed, has_bias=bias,
                                       activation=activation),
                   shared=SharedSpec(intermediate=shared) if shared else None, slots=tuple(slots))
    return rnd(T, H), params, spec


CASES = {
    "olmoe-like": {},
    "P=2 renorm": {"P": 2, "routing": "renorm"},
    "gptoss layout (torch routing)": {"routing": "gptoss", "bias": True, "interleaved": True, "transposed": True,
                                      "activation": "gptoss"},
    "shared experts": {"shared": 64},
}


def _routing(name):
    return {None: None, "renorm": RoutingSpec(renormalize=True),
            "gptoss": RoutingSpec(score_after_topk=True, router_bias=True)}[name]


@pytest.mark.parametrize("T", [1, 64, 300])
@pytest.mark.parametrize("case", list(CASES))
def test_replay_equals_first_call_and_reference(case, T):
    kw = dict(CASES[case])
    kw["routing"] = _routing(kw.get("routing"))
    x, params, spec = make(T, seed=T, **kw)
    first = dispatch.moe_triton(x, params, spec)
    plans = [p for p in dispatch._PLANS.values() if p.spec is spec and p.T == T]
    assert plans and plans[0].signature is not None, "the first call recorded no kernels"
    x2 = torch.randn_like(x)
    again = [dispatch.moe_triton(x, params, spec) for _ in range(3)]
    other = dispatch.moe_triton(x2, params, spec)
    for out in again:
        assert torch.equal(out, first)
    ref = reference.moe(x2, params, spec).float()  # bf16 like ours: same routing decisions
    assert rel_err(other, ref) < 1e-2


@pytest.mark.parametrize("mode,P,thr", [("1t", 1, (0.2, 0.0)), ("2t", 2, (0.2, 0.3)), ("skip", 1, (0.5, 0.0)),
                                        ("topk", 2, (0.0, 0.0))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_drop_matches_reference_rule_and_stats(mode, P, thr, dtype):
    x, params, spec = make(96, P=P, drop=mode, dtype=dtype, seed=5)
    thresholds = torch.tensor(thr, device="cuda")
    _, w, _ = reference.route(x, params, spec)
    keep = reference.keep_mask(w, spec, thresholds)
    ref_stats = torch.zeros(2, dtype=torch.float64, device="cuda")
    reference.record_drops(ref_stats, keep, spec)
    expected = dispatch.moe_triton(x, params, spec.replace(drop=DropSpec()), keep=keep)
    for _ in range(3):  # first call through Triton, then replays
        stats = torch.zeros(2, dtype=torch.float64, device="cuda")
        out = dispatch.moe_triton(x, params, spec, thresholds=thresholds, stats=stats)
        assert torch.equal(stats, ref_stats)
        assert torch.equal(out, expected)


def test_replay_inside_a_cuda_graph_with_new_thresholds():
    x, params, spec = make(64, P=2, drop="2t", seed=7)
    thresholds = torch.tensor([0.1, 0.2], device="cuda")
    stats = torch.zeros(2, dtype=torch.float64, device="cuda")
    static_x = x.clone()
    for _ in range(2):  # record the plan outside the graph
        dispatch.moe_triton(static_x, params, spec, thresholds=thresholds, stats=stats)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = dispatch.moe_triton(static_x, params, spec, thresholds=thresholds, stats=stats)
    for thr in ([0.1, 0.2], [0.15, 0.3], [0.0, 0.0]):
        thresholds.copy_(torch.tensor(thr))
        static_x.copy_(torch.randn_like(x))
        stats.zero_()
        graph.replay()
        expected = dispatch.moe_triton(static_x, params, spec, thresholds=thresholds)
        torch.cuda.synchronize()
        assert torch.equal(static_out, expected)
        _, w, _ = reference.route(static_x, params, spec)
        ref_stats = torch.zeros(2, dtype=torch.float64, device="cuda")
        reference.record_drops(ref_stats, reference.keep_mask(w, spec, thresholds), spec)
        assert torch.equal(stats, ref_stats)


@pytest.mark.parametrize("case,T", [("olmoe-like", 1), ("olmoe-like", 64), ("shared experts", 16),
                                    ("gptoss layout (torch routing)", 8), ("2t with statistics", 32)])
def test_small_calls_replay_their_own_cuda_graph(monkeypatch, case, T):
    """Calls of at most GRAPH_MAX_PAIRS pairs replay one CUDA graph per plan from the second call on: each call's
    output equals the plain launches' bit for bit, earlier outputs are not overwritten, drop statistics still
    accumulate, and thresholds moved to a new tensor make the plan fall back to plain launches."""
    two_t = case == "2t with statistics"
    kw = dict(P=2, drop="2t") if two_t else dict(CASES[case], routing=_routing(CASES[case].get("routing")))
    x0, params, spec = make(T, seed=11, **kw)
    thresholds = torch.tensor([0.1, 0.2], device="cuda") if two_t else None
    stats = torch.zeros(2, dtype=torch.float64, device="cuda") if two_t else None
    xs = [torch.randn_like(x0) for _ in range(4)]
    monkeypatch.setattr(dispatch, "GRAPH_MAX_PAIRS", 0)  # the plain launches, under a spec of their own
    plain_spec = spec.replace(name=spec.name + "-plain")
    expected = [dispatch.moe_triton(x, params, plain_spec, thresholds=thresholds) for x in xs]
    monkeypatch.setattr(dispatch, "GRAPH_MAX_PAIRS", 1024)
    outs = [dispatch.moe_triton(x, params, spec, thresholds=thresholds, stats=stats) for x in xs]
    plan = next(p for p in dispatch._PLANS.values() if p.spec is spec and p.T == T)
    assert plan.graph is not None, "the calls did not go through a CUDA graph"
    for out, exp in zip(outs, expected):
        assert torch.equal(out, exp)
    assert len({o.data_ptr() for o in outs}) == len(outs)
    if two_t:
        ref_stats = torch.zeros(2, dtype=torch.float64, device="cuda")
        for x in xs:
            _, w, _ = reference.route(x, params, spec)
            reference.record_drops(ref_stats, reference.keep_mask(w, spec, thresholds), spec)
        assert torch.equal(stats, ref_stats)
        moved = thresholds.clone() * 2
        out = dispatch.moe_triton(xs[0], params, spec, thresholds=moved, stats=stats)
        assert plan.graph is None and not plan.graphable
        assert torch.equal(out, dispatch.moe_triton(xs[0], params, plain_spec, thresholds=moved))
