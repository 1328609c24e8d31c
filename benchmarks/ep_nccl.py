"""Multi-GPU expert-parallel MoE layer on NCCL (issue 9): module time, all_to_all time, drop rate, per-rank load.

    torchrun --nproc-per-node N benchmarks/ep_nccl.py --json results/ep_nccl_N.json          # N GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/ep_nccl.py --device cpu --tiny --json /tmp/x.json  # CPU smoke run, gloo

NVLink multicast stays off: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set in this
process's environment before the process group exists.

What runs: one MoE layer through the project's EP operators (``runtime.ep.moe``: route + drop ->
dispatch all_to_all -> local experts -> combine all_to_all -> weighted sum + shared experts), each
rank with its OWN tokens (TOKENS per rank) and only its own experts' weights (the layout
``runtime.dist.shard_experts_`` gives a model: ``expert_offset`` / ``local_experts`` in the spec).

Shapes (bf16 on GPU, fp32 on CPU):
- deepseek_v2_lite: hidden 2048, 64 routed experts of intermediate 1408, top-6, softmax without
  renormalisation, 2 shared experts (one SwiGLU of intermediate 2 x 1408).
- olmoe: hidden 2048, 64 experts of 1024, top-8, softmax without renormalisation.

Routing: a random router (logits of std ~1) plus a per-expert logit bias (a router-bias slot) fitted so
that the per-expert share of (token, expert) pairs matches a target popularity:
- realistic: the project's trained model ``models/dsmoe-tiny`` (32 experts, top-4), its recorded
  per-expert loads on 16 test windows (``metrics.json``, ``expert_load_per_layer_test16``), of the
  layer with the median max/mean imbalance, scaled to 64 experts (expert e gets half the share of
  trained expert e // 2); used when that file exists, else the synthetic "moderate" popularity
  (exp(N(0, 0.5^2)) per expert) and the JSON says so.
- skewed: Zipf popularity p_e ~ (e + 1)^-0.7 in expert order (experts 0.. are the most popular and
  sit on the first ranks: the first rank is the straggler).

Variants: none (P = 1, the original layer); none P=2 (partial transformation, no dropping: isolates
the cost of the sub-expert split: a (token, slot) travels once per rank with the halves it kept,
or once per sub-expert with DSMOE_EP_NESTED=off); 2T-Drop with a
uniform threshold (P = 2, T fitted so that 1T would drop DROP of the pairs, thresholds (T - 0.01,
T + 0.01), averaged over ranks); 2T-Drop with load-aware thresholds (the same maximum thresholds,
policy ``--policy``, default literal T * min(r, 1)).

Timing: every rank makes the same fixed number of calls (WARMUP, then REPS timed), each timed call
preceded by a barrier, CUDA events around it (host clock on CPU), median per rank; all_to_all timed
the same way on the dispatch's real split sizes (the combine moves the same rows back). No do_bench
(it picks its own repetition count per rank, which deadlocks collectives). Drop rate and per-rank
load (pairs each rank computes, all ranks' tokens) come from one extra call with statistics on.
Rank 0 prints a table last and writes the JSON (and a .md beside it).

Comparisons and profiles: ``--ab-nested/--ab-fused/--ab-shared/--ab-sync/--ab-policy/--ab-sizes ROUNDS`` time each variant with one of
``runtime.ep``'s switches on and off, alternating in one process (the runs to trust; whole runs differ by up to
~20 %; an --ab run prints and saves ``ab``: each variant's median on both sides and the default's wins); ``--profile`` (torch.profiler: top GPU kernels and CPU ops, wall and GPU time per call) and
``--host-profile`` (cProfile, and each EP operator's host time through torch.ops and called directly) for the
variants named by ``--profile-variant``.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (device README, gpu-notes.md)
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dsmoe_compiler.codegen import reference  # noqa: E402
from dsmoe_compiler.ir import DropSpec, ExpertsSpec, MoESpec, RoutingSpec, SharedSpec  # noqa: E402
from dsmoe_compiler.runtime import dist as ds_dist  # noqa: E402
from dsmoe_compiler.runtime import ep, load_aware, state  # noqa: E402

SHAPES = {"deepseek_v2_lite": dict(H=2048, I=1408, E=64, K=6, shared=2 * 1408),
          "olmoe": dict(H=2048, I=1024, E=64, K=8, shared=0)}
TINY = {"deepseek_v2_lite": dict(H=64, I=32, E=16, K=6, shared=64), "olmoe": dict(H=64, I=32, E=16, K=8, shared=0)}
DROP = 0.20
TRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "dsmoe-tiny", "metrics.json")


# ---- routing targets ----------------------------------------------------------------------------------
def trained_popularity(E: int) -> tuple[torch.Tensor, str] | None:
    """Per-expert share of pairs from the trained model's recorded loads (median-imbalance layer), scaled to E."""
    if not os.path.exists(TRAINED):
        return None
    with open(TRAINED) as f:
        layers = json.load(f).get("expert_load_per_layer_test16")
    if not layers:
        return None
    loads = [torch.tensor(layer, dtype=torch.float64) for layer in layers]
    imbalance = [(lo.max() / lo.mean()).item() for lo in loads]
    pick = sorted(range(len(loads)), key=lambda i: imbalance[i])[len(loads) // 2]
    p = loads[pick] / loads[pick].sum()
    n = p.numel()
    if E % n == 0:
        scaled = p.repeat_interleave(E // n) / (E // n)
    else:  # fewer experts than trained (tiny smoke shapes): fold neighbours together
        scaled = torch.zeros(E, dtype=torch.float64).index_add_(0, torch.arange(n) * E // n, p)
    return scaled, f"models/dsmoe-tiny metrics.json layer {pick} (max/mean {imbalance[pick]:.2f}), {n} -> {E} experts"


def popularity(kind: str, E: int, seed: int) -> tuple[torch.Tensor, str]:
    if kind == "skewed":
        p = (torch.arange(E, dtype=torch.float64) + 1) ** -0.7
        return p / p.sum(), "Zipf (e + 1)^-0.7 in expert order"
    got = trained_popularity(E)
    if got is not None:
        return got
    g = torch.Generator().manual_seed(seed + 7)
    p = torch.exp(torch.randn(E, generator=g, dtype=torch.float64) * 0.5)
    return p / p.sum(), "synthetic moderate: exp(N(0, 0.5^2)) per expert (trained statistics not found)"


def fit_bias(router: torch.Tensor, spec: MoESpec, target: torch.Tensor, tokens: int, seed: int, iters: int = 40):
    """Router bias making the per-expert share of pairs approach target (fixed-point on log shares); on rank 0."""
    device, dtype = router.device, router.dtype
    g = torch.Generator(device="cpu").manual_seed(seed + 11)
    x = torch.randn(tokens, spec.hidden, generator=g).to(device, dtype)
    target = (target * spec.top_k).clamp(min=1e-6).to(device, torch.float32)  # expected pairs per token
    bias = torch.zeros(spec.num_experts, device=device, dtype=torch.float32)
    for _ in range(iters):
        _, _, index = reference.route(x, [router, bias.to(dtype)], spec)
        share = torch.bincount(index.flatten(), minlength=spec.num_experts).float() / tokens
        bias = (bias + 0.5 * torch.log(target / share.clamp(min=1e-6))).clamp(-20, 20)
    _, _, index = reference.route(x, [router, bias.to(dtype)], spec)
    share = torch.bincount(index.flatten(), minlength=spec.num_experts).float() / (tokens * spec.top_k)
    return bias.to(dtype), (share - target / spec.top_k).abs().sum().item() / 2  # total variation distance


# ---- the layer ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    partition: int
    mode: str
    policy: str | None = None
    nested: bool = True  # ep.NESTED_UNITS
    fused: bool = True  # ep.FUSED
    overlap: bool = True  # ep.SHARED_OVERLAP
    read_count: bool = False  # ep.READ_ROW_COUNT
    device_policy: bool = True  # ep.DEVICE_POLICY
    sizes_kernel: bool = True  # ep.SIZES_KERNEL


AB = {  # --ab-<switch> ROUNDS: Variant field, (value, name suffix) of each side, variants taken, what differs
    "fused": ("fused", (True, ""), (False, " torch-ops"), 4,
              "the EP route, drop and local labels by kernels and by torch ops (DSMOE_EP_FUSED)"),
    "shared": ("overlap", (True, ""), (False, " shared-after"), 3,
               "the shared experts run during the combine all_to_all and after its wait (DSMOE_EP_SHARED_OVERLAP)"),
    "sync": ("read_count", (False, ""), (True, " host-count"), 4,
             "no host read of the number of rows sent and with it (DSMOE_EP_READ_ROW_COUNT)"),
    "policy": ("device_policy", (True, ""), (False, " torch-policy"), 4,
               "a built-in load-aware policy's loads and thresholds by two launches and by torch ops "
               "(DSMOE_EP_DEVICE_POLICY)"),
    "sizes": ("sizes_kernel", (True, ""), (False, " torch-sizes"), 4,
              "the exchange sizes by one launch and by torch ops (DSMOE_EP_SIZES_KERNEL)"),
}


def make_spec(shape: dict, partition: int, mode: str, first: int, last: int, key: str = "") -> MoESpec:
    slots = ("router_weight", "router_bias", "gate_up", "down")
    if shape["shared"]:
        slots += ("shared_gate", "shared_up", "shared_down")
    held = last - first
    experts = ExpertsSpec(expert_offset=first, local_experts=held if held != shape["E"] else 0)
    return MoESpec(name="moe", num_experts=shape["E"], top_k=shape["K"], hidden=shape["H"], intermediate=shape["I"],
                   partition=partition, routing=RoutingSpec(renormalize=False, router_bias=True), experts=experts,
                   shared=SharedSpec(intermediate=shape["shared"]) if shape["shared"] else None,
                   drop=DropSpec(mode=mode, key=key), slots=slots)


def local_params(shape, first, last, router, bias, device, dtype, seed):
    """Router (whole), experts first..last-1 only (each expert from its own seed: the same on every rank), shared."""
    H, I = shape["H"], shape["I"]
    gu, dn = [], []
    for e in range(first, last):
        g = torch.Generator(device="cpu").manual_seed(seed * 1000 + e)
        gu.append((torch.randn(2 * I, H, generator=g) * 0.02).to(device, dtype))
        dn.append((torch.randn(H, I, generator=g) * 0.02).to(device, dtype))
    params = [router, bias, torch.stack(gu), torch.stack(dn)]
    if shape["shared"]:
        g = torch.Generator(device="cpu").manual_seed(seed * 1000 - 1)
        S = shape["shared"]
        params += [(torch.randn(S, H, generator=g) * 0.02).to(device, dtype),
                   (torch.randn(S, H, generator=g) * 0.02).to(device, dtype),
                   (torch.randn(H, S, generator=g) * 0.02).to(device, dtype)]
    return params


# ---- timing ---------------------------------------------------------------------------------------------
def barrier(device):
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def timed_ms(fn, device, warmup: int, reps: int) -> float:
    """Median of REPS calls, each after a barrier; the same number of calls on every rank."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        barrier(device)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pick_impl(requested: str, device, dtype) -> tuple[str, dict]:
    """triton on CUDA if ep.local_experts' Triton path agrees with its loop on sharded weights (every rank agrees)."""
    if requested != "auto":
        return requested, {"requested": requested}
    if device.type != "cuda":
        return "reference", {"ran": False}
    info = {"ran": True}
    try:
        g = torch.Generator(device="cpu").manual_seed(1)
        spec = MoESpec(name="chk", num_experts=8, top_k=2, hidden=256, intermediate=128, partition=2,
                       experts=ExpertsSpec(expert_offset=4, local_experts=4), slots=("router_weight", "gate_up", "down"))
        params = [(torch.randn(8, 256, generator=g) * 0.1).to(device, dtype),
                  (torch.randn(4, 256, 256, generator=g) * 0.05).to(device, dtype),
                  (torch.randn(4, 256, 128, generator=g) * 0.05).to(device, dtype)]
        errors = []
        for nested in (False, True):  # one row per sub-expert; rows carrying both halves (P = 2 partial)
            e = ep.EPSpec(group="", rank=1, world=2, ranges=(0, 8, 16), key="", nested=nested)
            lo, hi = e.group_ranges[1:]
            counts = torch.randint(0, 40, (2, e.groups), generator=g).to(device)
            recv = torch.randn(int(counts[:, lo:hi].sum()), 256, generator=g).to(device, dtype)
            a = ep.local_experts(recv, counts, params, spec.to_json(), e.to_json(), "triton").float()
            b = ep.local_experts(recv, counts, params, spec.to_json(), e.to_json(), "reference").float()
            errors.append(((a - b).norm() / b.norm()).item())
        info["rel_err"] = max(errors)
        ok = info["rel_err"] < 2e-2
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, then the reference loop is used
        info["error"] = f"{type(exc).__name__}: {exc}"[:500]
        ok = False
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return ("triton" if flag.item() else "reference"), info


# ---- one configuration ------------------------------------------------------------------------------------
def run_config(shape_name, shape, routing, tokens, args, device, dtype, rank, world, impl):
    E = shape["E"]
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    router = (torch.randn(E, shape["H"], generator=g)).to(device, dtype) / shape["H"] ** 0.5  # logits of std ~1
    target, source = popularity(routing, E, args.seed)
    route_spec = make_spec(shape, 1, "none", 0, E)
    bias, tv = fit_bias(router, route_spec, target, args.calib_tokens, args.seed)
    dist.broadcast(bias, src=0)
    gx = torch.Generator(device="cpu").manual_seed(args.seed * 100 + rank + 1)
    x = torch.randn(tokens, shape["H"], generator=gx).to(device, dtype)
    _, raw, _ = reference.route(x, [router, bias], route_spec)
    s = reference.normalized_scores(raw).flatten().float()
    sample = s[torch.randperm(s.numel(), device=s.device)[:1 << 20]]
    T = torch.quantile(sample, DROP).reshape(1)
    dist.all_reduce(T)
    T = T.item() / world
    group = dist.group.WORLD
    rows = []
    params_cache = {}
    variants = [Variant("none", 1, "none"), Variant("none P=2", 2, "none"), Variant("2T uniform", 2, "2t", "uniform"),
                Variant(f"2T load-aware ({args.policy})", 2, "2t", args.policy)]
    if args.ab_nested:  # P = 2 with nested units (ep.NESTED_UNITS) on and off, alternating, in one process
        variants = [v for _ in range(args.ab_nested) for v in [variants[0]] + [
            Variant(f"{name}{'' if nested else ' flat'}", 2, mode, policy, nested=nested)
            for name, mode, policy in (("none P=2", "none", None), ("2T uniform", "2t", "uniform"))
            for nested in (True, False)]]
    for switch, (field, first, second, count, _) in AB.items():  # --ab-<switch> ROUNDS
        rounds = getattr(args, f"ab_{switch}")
        variants = [dataclasses.replace(v, name=v.name + suffix, **{field: value}) for _ in range(rounds)
                    for v in variants[:count] for value, suffix in (first, second)] if rounds else variants
    for v in variants:
        variant, P, mode, policy = v.name, v.partition, v.mode, v.policy
        ep.NESTED_UNITS, ep.FUSED, ep.SHARED_OVERLAP, ep.READ_ROW_COUNT = v.nested, v.fused, v.overlap, v.read_count
        ep.DEVICE_POLICY, ep.SIZES_KERNEL = v.device_policy, v.sizes_kernel
        first, last = ds_dist.local_expert_range(E, P, rank, world)
        if (first, last) not in params_cache:
            params_cache.clear()
            params_cache[(first, last)] = local_params(shape, first, last, router, bias, device, dtype, args.seed)
        params = params_cache[(first, last)]
        thresholds = (max(T - 0.01, 0.0), T + 0.01)
        load_aware.set_policy(None if policy in (None, "uniform") else policy)
        results = {}
        for stats in (False, True):
            key = state.register("moe", *thresholds, device, False) if mode != "none" else ""
            spec = make_spec(shape, P, mode, first, last, key)
            spec_json = spec.to_json()
            ep_json = ep.ep_spec_for(spec, group, stats=stats).to_json()
            call = lambda: ep.moe(x, params, spec_json, ep_json, impl)  # noqa: E731
            if stats:
                ep.reset_ep_stats()
                call()
                st = ep.ep_stats()["moe"]
                results["load_before"] = [int(v) for v in st["last_load_before"]]
                results["load_after"] = [int(v) for v in st["last_load_after"]]
                results["drop_rate"] = 1 - sum(results["load_after"]) / max(sum(results["load_before"]), 1)
            else:
                results["moe_ms"] = timed_ms(call, device, args.warmup, args.reps)
                send, _, _, _, sizes = ep.ep_route(x, params, spec_json, ep_json, impl)
                send_splits, recv_splits = ep.splits(sizes, ep_json)
                name = ds_dist.group_name(group)
                send = ep.sent_rows(send, send_splits)
                recv = ds_dist.all_to_all(send, recv_splits, send_splits, name)
                results["dispatch_ms"] = timed_ms(lambda: ds_dist.all_to_all(send, recv_splits, send_splits, name),
                                                  device, args.warmup, args.reps)
                results["combine_ms"] = timed_ms(lambda: ds_dist.all_to_all(recv, send_splits, recv_splits, name),
                                                 device, args.warmup, args.reps)
                if args.profile and variant in args.profile_variant:
                    profile_call(call, f"{shape_name} {routing} T={tokens} {variant}", device, rank)
                if args.host_profile and variant in args.profile_variant:
                    host_profile(call, f"{shape_name} {routing} T={tokens} {variant}", device, rank)
                    host_split(x, params, spec_json, ep_json, impl, f"{shape_name} {routing} T={tokens} {variant}",
                               device, rank)
                results["rows_sent"] = sum(send_splits)
                results["rows_sent_remote"] = sum(send_splits) - send_splits[rank]
                del send, recv
        load_aware.set_policy(None)
        state.clear()
        ep.clear()
        every = [None] * world
        dist.all_gather_object(every, {k: results[k] for k in ("moe_ms", "dispatch_ms", "combine_ms", "rows_sent",
                                                                "rows_sent_remote")})
        rows.append(dict(shape=shape_name, routing=routing, routing_source=source, routing_fit_tv=tv,
                         tokens_per_rank=tokens, world=world, variant=variant, partition=P, thresholds=list(thresholds),
                         held_experts=[first, last], load_before=results["load_before"], load_after=results["load_after"],
                         drop_rate=results["drop_rate"],
                         imbalance_after=max(results["load_after"]) / (sum(results["load_after"]) / world),
                         moe_ms_per_rank=[r["moe_ms"] for r in every], dispatch_ms_per_rank=[r["dispatch_ms"] for r in every],
                         combine_ms_per_rank=[r["combine_ms"] for r in every],
                         rows_sent_per_rank=[r["rows_sent"] for r in every],
                         rows_sent_remote_per_rank=[r["rows_sent_remote"] for r in every]))
        if rank == 0:
            r = rows[-1]
            print(f"{shape_name} {routing} T={tokens} {variant:28s} moe {max(r['moe_ms_per_rank']):.3f} ms  "
                  f"a2a {max(r['dispatch_ms_per_rank']):.3f}+{max(r['combine_ms_per_rank']):.3f} ms  "
                  f"drop {r['drop_rate']:.3f}  load {r['load_after']}", flush=True)
        del params
    return rows


def profile_call(call, title, device, rank, calls=3, top=14):
    """Every rank profiles the same calls (collectives); rank 0 prints the top GPU kernels and CPU ops."""
    barrier(device)
    start = time.perf_counter()
    with torch.profiler.profile() as prof:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    if rank != 0:
        return
    events = prof.key_averages()
    gpu_ms = sum(getattr(ev, "self_device_time_total", 0) for ev in events) / 1e3 / calls
    print(f"profile {title}: wall {wall_ms:.3f} ms per call (profiled), GPU busy {gpu_ms:.3f} ms per call "
          "(kernel time summed; collectives included)")
    for label, key in (("GPU", "self_device_time_total"), ("CPU", "self_cpu_time_total")):
        rows = sorted(((getattr(ev, key, 0) / 1e3 / calls, ev.count // calls, ev.key[:70]) for ev in events), reverse=True)
        print(f"profile {title}: {label} ms per call (self), top {top}")
        for ms, count, name in rows[:top]:
            print(f"  {ms:8.3f}  x{count:<4d} {name}")


def host_profile(call, title, device, rank, calls=20, top=25):
    """Every rank runs the same calls under cProfile; rank 0 prints the functions with the most own host time."""
    import cProfile
    import io
    import pstats

    barrier(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    if rank != 0:
        return
    for order, restrict, label in (("tottime", (), "own time"), ("cumulative", ("dsmoe_compiler|/runtime/|/codegen/",),
                                                                   "cumulative time, the project's functions")):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats(order).print_stats(*restrict, top)
        body = [line for line in out.getvalue().splitlines() if line.strip()]
        body = body[next(i for i, line in enumerate(body) if "ncalls" in line):]
        print(f"host profile {title}: {stats.total_tt * 1e3 / calls:.3f} ms per call (cProfile), {calls} calls, "
              f"top {top} by {label}")
        print("\n".join(line.replace(os.path.dirname(os.path.dirname(os.__file__)), "") for line in body))


def host_split(x, params, spec_json, ep_json, impl, title, device, rank, calls=30):
    """Host time of each EP operator, through the dispatcher (torch.ops) and called directly (``ep.route``,
    ...): the device synchronised before each call, the host clock stopped when the call returns (its
    launches, not its kernels). Every rank makes the same calls; rank 0 prints medians in µs."""
    ops, name = torch.ops.dualsparse, ep.parse_ep(ep_json).group
    send, row, weight, counts, sizes = ep.ep_route(x, params, spec_json, ep_json, impl)
    send_splits, recv_splits = ep.splits(sizes, ep_json)
    recv = ds_dist.all_to_all(ep.sent_rows(send, send_splits), recv_splits, send_splits, name)
    back = ds_dist.all_to_all(ep.ep_experts(recv, counts, params, spec_json, ep_json, impl), send_splits, recv_splits,
                              name)
    steps = {"ep_route": (lambda: ops.ep_route(x, params, spec_json, ep_json, impl),
                          lambda: ep.route(x, params, spec_json, ep_json, impl)),
             "splits": (lambda: ep.splits(sizes, ep_json),) * 2,
             "ep_experts": (lambda: ops.ep_experts(recv, counts, params, spec_json, ep_json, impl),
                            lambda: ep.local_experts(recv, counts, params, spec_json, ep_json, impl)),
             "ep_combine": (lambda: ops.ep_combine(x, back, row, weight, params, spec_json, ep_json, impl),
                            lambda: ep.combine(x, back, row, weight, params, spec_json, ep_json, impl))}
    group, post = ds_dist.group_by_name(name), counts[ep.parse_ep(ep_json).rank]
    steps["all-gather"] = (lambda: ds_dist.all_gather_functional(post, group), lambda: ds_dist.all_gather_rows(post, group))
    medians = {}
    for step, fns in steps.items():
        for how, fn in zip(("op", "direct"), fns):
            times = []
            for _ in range(calls):
                barrier(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            medians[(step, how)] = statistics.median(times)
    if rank == 0:
        print(f"host split {title}: µs per call, host only (op = through torch.ops; direct = the Python function; "
              "all-gather: op = functional, direct = c10d)")
        for step in steps:
            print(f"  {step:12s} op {medians[(step, 'op')]:8.1f}   direct {medians[(step, 'direct')]:8.1f}")


def ab_summary(rows, suffix: str) -> tuple[list[dict], str]:
    """The alternating A/B of an --ab-<switch> run: each row whose variant ends in ``suffix`` against the row before
    it (the same variant with the switch at its default, run just before). Per (shape, routing, tokens, variant):
    median MoE ms of each side over the rounds and how many pairs the default side was faster in."""
    pairs = {}
    for a, b in zip(rows, rows[1:]):
        if b["variant"] == a["variant"] + suffix and (a["shape"], a["routing"], a["tokens_per_rank"]) == \
                (b["shape"], b["routing"], b["tokens_per_rank"]):
            key = (a["shape"], a["routing"], a["tokens_per_rank"], a["variant"])
            pairs.setdefault(key, []).append((max(a["moe_ms_per_rank"]), max(b["moe_ms_per_rank"])))
    out = [dict(shape=k[0], routing=k[1], tokens_per_rank=k[2], variant=k[3], pairs=v,
                default_ms=statistics.median(x for x, _ in v), switched_ms=statistics.median(y for _, y in v),
                default_faster=sum(x < y for x, y in v)) for k, v in pairs.items()]
    lines = [f"| shape | routing | tokens/rank | variant | MoE ms (median) | MoE ms{suffix} (median) | default faster |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['routing']} | {r['tokens_per_rank']} | {r['variant']} | {r['default_ms']:.3f} | "
              f"{r['switched_ms']:.3f} | {r['default_faster']}/{len(r['pairs'])} |" for r in out]
    return out, "\n".join(lines)


def table(rows) -> str:
    lines = ["| shape | routing | tokens/rank | variant | drop rate | load per rank (pairs) | max/mean | "
             "MoE ms (max rank) | vs none | dispatch ms | combine ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["shape"], r["routing"], r["tokens_per_rank"]): max(r["moe_ms_per_rank"]) for r in rows if r["variant"] == "none"}
    for r in rows:
        ms = max(r["moe_ms_per_rank"])
        ref = base[(r["shape"], r["routing"], r["tokens_per_rank"])]
        lines.append(f"| {r['shape']} | {r['routing']} | {r['tokens_per_rank']} | {r['variant']} | {r['drop_rate']:.3f} | "
                     f"{r['load_after']} | {r['imbalance_after']:.2f} | {ms:.3f} | {ref / ms:.2f}x | "
                     f"{max(r['dispatch_ms_per_rank']):.3f} | {max(r['combine_ms_per_rank']):.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="default results/ep_nccl_<world>.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens per rank")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--routing", nargs="+", default=["realistic", "skewed"], choices=["realistic", "skewed"])
    ap.add_argument("--policy", default="literal", choices=sorted(set(load_aware.POLICIES) - {"uniform"}))
    ap.add_argument("--impl", default="auto", choices=["auto", "triton", "reference"],
                    help="local experts: auto = Triton on CUDA if it checks out, else the reference loop")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and token counts: a CPU smoke run")
    ap.add_argument("--profile", action="store_true", help="profile one variant: top kernels and CPU ops")
    ap.add_argument("--host-profile", action="store_true", help="cProfile the --profile-variant variants")
    ap.add_argument("--profile-variant", nargs="+", default=["none"], help="the variants --profile profiles (default: none)")
    ap.add_argument("--ab-nested", type=int, default=0, metavar="ROUNDS",
                    help="instead of the four variants: P=2 without dropping and 2T uniform, each with nested units "
                         "on and off (DSMOE_EP_NESTED), alternating, ROUNDS times")
    for switch, (_, _, _, count, what) in AB.items():
        ap.add_argument(f"--ab-{switch}", type=int, default=0, metavar="ROUNDS",
                        help=f"the first {count} variants, each with {what}, alternating, ROUNDS times")
    args = ap.parse_args()
    device = torch.device(args.device)
    ds_dist.init(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY if args.tiny else SHAPES
    if args.tiny:
        args.tokens, args.warmup, args.reps, args.calib_tokens = [32, 64], 1, 3, 512
    impl, impl_check = pick_impl(args.impl, device, dtype)
    t0 = time.time()
    rows = []
    for shape_name in args.shapes:
        for routing in args.routing:
            for tokens in args.tokens:
                rows += run_config(shape_name, shapes[shape_name], routing, tokens, args, device, dtype, rank, world, impl)
    if rank == 0:
        meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    backend=dist.get_backend(), world=world, torch=torch.__version__, dtype=str(dtype), impl=impl,
                    impl_check=impl_check, shapes={k: shapes[k] for k in args.shapes}, warmup=args.warmup, reps=args.reps,
                    target_uniform_drop=DROP, policy=args.policy, seconds=time.time() - t0,
                    env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
                    timing="fixed calls on every rank, barrier before each, CUDA events (host clock on CPU), median per rank")
        path = args.json or f"results/ep_nccl_{world}.json"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        text, result = table(rows), dict(meta=meta, rows=rows)
        switches = [AB[s][2][1] for s in AB if getattr(args, f"ab_{s}")]
        if switches:  # one --ab-<switch> per run: a second one would pair the first one's variants
            result["ab"], ab_text = ab_summary(rows, switches[0])
            text = ab_text + "\n\n" + text
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(f"{json.dumps(meta)}\n\n{text}\n")
        print(json.dumps(meta))
        if "error" in impl_check:  # the Triton local path failed its check: these are the reference loop's times
            print(f"WARNING: impl {impl}, the Triton path failed: {impl_check['error']}")
        print(text, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
