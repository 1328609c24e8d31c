"""Checks shared by the interpreter tests (test_kernels.py) and the GPU tests (test_gpu.py) of EP's send order."""

import torch
from dsmoe_compiler.codegen import reference
from dsmoe_compiler.runtime import ep, state

from dsmoe_compiler.ir import DropSpec


def send_order_case(*, T, K, E, H, nested, split, drop, device, dtype=torch.float32):
    """(x, expert ids [T, K] int32, keep [T, K * P] or None, EPSpec) of one rank of two: P = 2 partial with nested
    units, or P = 1; ``split`` puts the rank boundary inside an expert (nested only), ``drop`` drops ~30 % of the
    (token, sub-expert) pairs."""
    g = torch.Generator().manual_seed(3 + 2 * nested + split)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device, torch.int32)
    P = 2 if nested else 1
    ranges = (0, E - 1 if split else E // 2 * P, E * P)
    spec = ep.EPSpec(group="", rank=0, world=2, ranges=ranges, key="", nested=nested)
    keep = (torch.rand(T, K * P, generator=g) > 0.3).to(device) if drop else None
    return x, experts, keep, spec


def check_send_order(x, experts, keep, spec):
    """The kernels' groups and send order against torch's: the same group per (token, column), the same rows per
    group and entries unsent; every (token, column) comes back from a row that holds its token, inside its
    group's rows."""
    group_of = ep._groups(experts, lambda: experts.long(), keep, spec, fused=False)
    group_f = ep._groups(experts, lambda: experts.long(), keep, spec, fused=True)
    assert torch.equal(group_f.long(), group_of.long()), "the kernel's unit groups differ from torch's"
    for _ in range(2):  # on the GPU the second call replays the recorded launches (launch.py) on new buffers
        x = x.flip(0)
        send_f, row_f, post_f = ep._send_order(x, group_f, spec, fused=True)
    send_t, row_t, post_t = ep._send_order(x, group_of, spec, fused=False)
    assert post_f.tolist() == post_t.tolist() and post_f.dtype == post_t.dtype
    assert send_f.shape == send_t.shape == (ep.rows_bound(*row_f.shape, spec), x.shape[1])
    assert row_f.shape == row_t.shape
    assert ((row_f < 0) == (row_t < 0)).all()
    live = row_f >= 0
    tokens = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(row_f)
    assert torch.equal(send_f[row_f[live].long()], x[tokens[live]]), "a row does not hold its entry's token"
    first = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), post_f.cumsum(0)])
    rows_group = torch.bucketize(row_f[live].long(), first[1:], right=True)
    assert torch.equal(rows_group, group_of[live].long()), "an entry's row lies outside its group's rows"


def check_route_and_drop(x, params, spec, mode):
    """EP's routing with uniform thresholds through the route kernel (``ep._route``, fused) against the torch route:
    the same ids, the same weights (to rounding), and on them ``keep_per_destination``'s pairs (P = 2 partial: Major
    and Minor column blocks) and ``record_drops``' statistics. Twice: on the GPU the second call replays the
    recorded launch."""
    P = spec.partition
    key = state.register("moe", 0.2, 0.4, x.device, True)
    try:
        spec = spec.replace(drop=DropSpec(mode=mode, key=key))
        block = state.lookup(key)
        raw_t, experts_t, keep_t = ep._route(x, params, spec, block, None, fused=False)
        assert keep_t is None
        spec_ep = ep.EPSpec(group="", rank=0, world=2, ranges=(0, spec.num_experts // 2 * P, spec.num_experts * P),
                            key="")
        for _ in range(2):
            block.stats.zero_()
            raw_f, experts_f, keep_f = ep._route(x, params, spec, block, None, fused=True)
            assert torch.equal(experts_f.long(), experts_t.long()) and torch.allclose(raw_f, raw_t, rtol=1e-5, atol=0)
            sub = reference.partial_transform(experts_f.long(), raw_f, P)[0] if P > 1 else experts_f.long()
            want = ep.keep_per_destination(raw_f, sub, spec, block.thresholds.expand(2, 2), ep.owners(spec_ep, x.device))
            assert 0 < (~want).sum() < want.numel()
            assert torch.equal(keep_f, want), "the route kernel kept other pairs"
            want_stats = torch.zeros_like(block.stats)
            reference.record_drops(want_stats, want, spec)
            torch.testing.assert_close(block.stats, want_stats, rtol=0, atol=0)
    finally:
        state.clear()


def check_keep_per_destination(mode, P, device, T=300, E=6, K=3, world=3):
    """``dispatch.keep_per_destination`` (one kernel) against ``ep.keep_per_destination`` and ``record_drops``:
    each rank's own thresholds (a load-aware policy's [W, 2]), P = 2 partial (Major and Minor blocks) or P = 1."""
    from dsmoe_compiler.codegen import dispatch

    from dsmoe_compiler.ir import MoESpec

    g = torch.Generator().manual_seed(P * 10 + len(mode))
    spec = MoESpec(name="b", num_experts=E, top_k=K, hidden=8, intermediate=8 * P, partition=P,
                   drop=DropSpec(mode=mode), slots=("router_weight", "gate_up", "down"))
    weights = (torch.rand(T, K, generator=g) + 0.01).to(device)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device, torch.int32)
    spec_ep = ep.EPSpec(group="", rank=0, world=world, ranges=tuple((r * E * P) // world for r in range(world + 1)),
                        key="")
    owner = ep.owners(spec_ep, device)
    thresholds = torch.tensor([[0.2, 0.35], [0.3, 0.5], [0.1, 0.25]], device=device)[:world]
    if mode == "skip":
        thresholds = thresholds * 2
    sub = reference.partial_transform(experts.long(), weights, P)[0] if P > 1 else experts.long()
    want = ep.keep_per_destination(weights, sub, spec, thresholds, owner)
    assert 0 < (~want).sum() < want.numel()
    want_stats = torch.zeros(2, dtype=torch.float64, device=device)
    reference.record_drops(want_stats, want, spec)
    for _ in range(2):  # on the GPU the second call replays the recorded launch
        stats = torch.zeros(2, dtype=torch.float64, device=device)
        got = dispatch.keep_per_destination(weights, experts, spec, thresholds, owner, stats)
        assert torch.equal(got.bool(), want), f"{mode} P={P}: other pairs kept"
        torch.testing.assert_close(stats, want_stats, rtol=0, atol=0)


def check_load_policy(device, T=300, K=3):
    """``codegen/load_policy.py`` against the torch ops it replaces: pairs per destination (``ep._loads_to``) for
    P = 1 and 2 and 1 to 5 ranks, and each built-in policy's [W, 2] thresholds (``load_aware``) from gathered
    loads that include an empty rank, equal ranks and an all-zero call; 1T and 2T blocks. Outputs poisoned."""
    from dsmoe_compiler.codegen.load_policy import loads_to, policy_thresholds
    from dsmoe_compiler.ir import MoESpec
    from dsmoe_compiler.runtime import load_aware

    g = torch.Generator().manual_seed(T + K)
    for world, E, P in ((1, 4, 1), (2, 8, 2), (3, 6, 2), (5, 16, 1), (4, 3, 2)):
        spec = MoESpec(name="b", num_experts=E, top_k=K, hidden=8, intermediate=8 * P, partition=P,
                       transform="partial" if P > 1 else "none", slots=("router_weight", "gate_up", "down"))
        e = ep.EPSpec(group="", rank=0, world=world, ranges=tuple((r * E * P) // world for r in range(world + 1)), key="")
        experts = torch.randint(0, E, (T, K), generator=g).to(device, torch.int32)
        want = ep._loads_to(experts, spec, e)
        got = loads_to(experts, ep.owners(e, device), P, world,
                       out=torch.full((world,), -1, dtype=torch.int64, device=device))
        assert got.dtype == torch.int64 and torch.equal(got, want), f"W={world} P={P}: {got.tolist()} != {want.tolist()}"
        assert int(got.sum()) == T * K * P
    policies = [load_aware.uniform, load_aware.literal, load_aware.steep(2.0), load_aware.steep(0.5),
                load_aware.shift_centre(), load_aware.shift_centre(0.02)]
    for world in (1, 2, 3, 8):
        cases = [torch.randint(0, 5000, (world, world), generator=g), torch.zeros(world, world, dtype=torch.long),
                 torch.full((world, world), 7, dtype=torch.long)]
        cases[0][:, -1] = 0  # the last rank gets nothing
        for gathered in cases:
            for mode, t_max in (("2t", (0.25, 0.4)), ("1t", (0.3, 0.3))):
                t = torch.tensor(t_max, device=device)
                info = load_aware.LoadInfo("b", mode, gathered.to(device).sum(0).float(), t, 0, world)
                for policy in policies:
                    want = load_aware.thresholds_per_rank(policy, info)
                    got = policy_thresholds(gathered.to(device), t, load_aware.device_rule(policy), mode,
                                            out=torch.full((world, 2), float("nan"), device=device))
                    assert not got.isnan().any()
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=0,
                                               msg=lambda m: f"{policy.__name__} {mode} W={world}: {m}")
    assert load_aware.device_rule(lambda info: info.thresholds.expand(info.world, 2)) is None
