"""Straggler time of expert parallelism on one GPU: N ranks' local grouped GEMMs, uniform vs load-aware thresholds.

    PYTHONUNBUFFERED=1 python benchmarks/ep_straggler.py --json results/ep_straggler.json

What is simulated: N EP ranks (N = 2, 4, 8), each with its own TOKENS tokens, OLMoE's MoE shape
(H 2048, I 1024, E 64, top-8, softmax without renormalisation), bf16. Routing of all N*TOKENS
tokens is computed on the GPU from a random router plus a per-expert popularity bias on the logits
(synthetic routing statistics: no real model's router is available offline); two settings,
"moderate" (bias std 0.5) and "skewed" (bias std 1.0). Rank d holds the contiguous sub-experts of
``dist.expert_ranges``. For every policy, the kept pairs are those of ``ep.keep_per_destination``
with the thresholds ``load_aware`` gives each destination rank from the all-ranks loads (exactly
what ``dualsparse.ep_route`` computes); then each rank's local computation — the pairs it
receives, sorted by local sub-expert, through gate/up GEMM, SwiGLU, down GEMM (the unweighted
expert outputs that ``ep_experts`` returns) — is run and timed alone on the one GPU, with each
rank's local weights stored contiguously as a real rank would. Straggler time = max over ranks
(the layer waits for the slowest rank); communication is not simulated.

Thresholds: 1T with T fitted so that the uniform threshold drops DROP (20 %) of the pairs; 2T with
(T - 0.01, T + 0.01) on Major/Minor halves (P = 2) for the same T. Policies: none (no dropping),
uniform, literal (T * r), steep2 (T * clamp(1 - 2(1 - r), 0, 1)), shift_centre (2T centre * r).

Kernel: ``torch._grouped_mm`` (one grouped GEMM over the rank's sub-experts) when it runs on this
GPU, else a loop of matmuls; recorded in the JSON. Timing: CUDA events around WARMUP + REPS calls,
median. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dsmoe_compiler.codegen import reference
from dsmoe_compiler.ir import DropSpec, ExpertsSpec, MoESpec, RoutingSpec
from dsmoe_compiler.runtime import dist as ds_dist
from dsmoe_compiler.runtime import ep, load_aware

H, I, E, K = 2048, 1024, 64, 8
DROP = 0.20
WARMUP, REPS = 3, 15


def block(partition: int, mode: str) -> MoESpec:
    return MoESpec(name="olmoe", num_experts=E, top_k=K, hidden=H, intermediate=I, partition=partition,
                   routing=RoutingSpec(renormalize=False), experts=ExpertsSpec(), drop=DropSpec(mode=mode),
                   slots=("router_weight", "gate_up", "down"))


def route_all(x, router, bias, spec):
    """Weights, partial-transformed sub-expert indices and raw (pre-transform) weights of all tokens."""
    logits = F.linear(x, router) + bias
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = probs.topk(K, dim=-1)
    w = w.to(x.dtype)
    raw = w
    idx, w = reference.partial_transform(idx, w, spec.partition)
    return raw, idx, w


def local_weights(gate_up, down, lo, hi, P):
    """[G, H, 2c] gate|up and [G, c, H] down of sub-experts lo..hi-1, contiguous (a rank's own copy)."""
    c = I // P
    gu, dn = [], []
    for s in range(lo, hi):
        e, p = divmod(s, P)
        g, u = gate_up[e, p * c:(p + 1) * c], gate_up[e, I + p * c:I + (p + 1) * c]
        gu.append(torch.cat([g, u], 0).t())
        dn.append(down[e, :, p * c:(p + 1) * c].t())
    return torch.stack(gu).contiguous(), torch.stack(dn).contiguous()


def make_local(kernel):
    def run(xs, offs, counts, wgu, wdn):
        if kernel == "grouped_mm":
            h = torch._grouped_mm(xs, wgu, offs=offs)
            c = h.shape[1] // 2
            a = F.silu(h[:, :c]) * h[:, c:]
            return torch._grouped_mm(a, wdn, offs=offs)
        out, start = torch.empty_like(xs), 0
        for g, n in enumerate(counts):
            if n:
                h = xs[start:start + n] @ wgu[g]
                c = h.shape[1] // 2
                out[start:start + n] = (F.silu(h[:, :c]) * h[:, c:]) @ wdn[g]
            start += n
        return out
    return run


def time_ms(fn, device) -> float:
    if device.type != "cuda":
        t = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t)
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def pick_kernel(device, dtype) -> str:
    """grouped_mm if it runs here and agrees with the matmul loop, else the loop."""
    if not hasattr(torch, "_grouped_mm"):
        return "loop"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        counts = [5, 0, 37, 16]
        xs = torch.randn(sum(counts), 256, generator=g).to(device, dtype)
        wgu = (torch.randn(4, 256, 128, generator=g) * 0.05).to(device, dtype)
        wdn = (torch.randn(4, 64, 256, generator=g) * 0.05).to(device, dtype)
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        a = make_local("grouped_mm")(xs, offs, counts, wgu, wdn)
        b = make_local("loop")(xs, offs, counts, wgu, wdn)
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        return "grouped_mm" if err < 2e-2 else "loop"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the loop
        print(f"grouped_mm unavailable ({type(exc).__name__}: {exc}); using the matmul loop")
        return "loop"


def fitted_threshold(raw: torch.Tensor) -> float:
    """T such that 1T (keep iff normalised score > T) drops DROP of the pairs."""
    s = reference.normalized_scores(raw).flatten()
    return torch.quantile(s[torch.randperm(s.numel(), device=s.device)[:1 << 20]].float(), DROP).item()


def check_triton_local(device) -> dict:
    """The EP operator's Triton local path (``ep.local_experts(impl="triton")``) against its reference loop."""
    if device.type != "cuda":
        return {"ran": False}
    try:
        g = torch.Generator(device="cpu").manual_seed(1)
        spec = MoESpec(name="chk", num_experts=8, top_k=2, hidden=256, intermediate=128, partition=2,
                       slots=("router_weight", "gate_up", "down"))
        params = [(torch.randn(8, 256, generator=g) * 0.1).to(device, torch.bfloat16),
                  (torch.randn(8, 256, 256, generator=g) * 0.05).to(device, torch.bfloat16),
                  (torch.randn(8, 256, 128, generator=g) * 0.05).to(device, torch.bfloat16)]
        e = ep.EPSpec(group="", rank=1, world=2, ranges=(0, 8, 16), key="")
        counts = torch.randint(0, 40, (2, 16), generator=g).to(device)
        recv = torch.randn(int(counts[:, 8:].sum()), 256, generator=g).to(device, torch.bfloat16)
        a = ep.local_experts(recv, counts, params, spec.to_json(), e.to_json(), "triton").float()
        b = ep.local_experts(recv, counts, params, spec.to_json(), e.to_json(), "reference").float()
        return {"ran": True, "rel_err": ((a - b).norm() / b.norm()).item()}
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return {"ran": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def run(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    kernel = pick_kernel(device, dtype)
    run_local = make_local(kernel)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.02).to(device, dtype)
    down = (torch.randn(E, H, I, generator=g) * 0.02).to(device, dtype)
    router = (torch.randn(E, H, generator=g) * 0.02).to(device, dtype)
    rows = []
    for routing, bias_std in (("moderate", 0.5), ("skewed", 1.0)):
        bias = (torch.randn(E, generator=g) * bias_std).to(device, dtype)
        for N in args.ranks:
            x = torch.randn(N * args.tokens, H, generator=g).to(device, dtype)
            for mode, P in (("1t", 1), ("2t", 2)):
                spec = block(P, mode)
                raw, idx, w = route_all(x, router, bias, spec)
                T = fitted_threshold(raw)
                base = torch.tensor([T, T] if mode == "1t" else [max(T - 0.01, 0.0), T + 0.01],
                                    dtype=torch.float32, device=device)
                ranges = ds_dist.expert_ranges(E * P, N)
                epspec = ep.EPSpec(group="", rank=0, world=N, ranges=tuple(ranges), key="")
                owner = ep.owners(epspec, device)
                pre_subs = torch.bincount(idx.flatten(), minlength=E * P)
                loads = torch.zeros(N, device=device).index_add_(0, owner, pre_subs.float())
                info = load_aware.LoadInfo("olmoe", mode, loads, base, 0, N)
                weights_by_rank = [local_weights(gate_up, down, ranges[d], ranges[d + 1], P) for d in range(N)]
                policies = ["none", "uniform", "literal", "steep2"] + (["shift_centre"] if mode == "2t" else [])
                for policy in policies:
                    if policy == "none":
                        keep = torch.ones_like(idx, dtype=torch.bool)
                    else:
                        thr = load_aware.thresholds_per_rank(load_aware.POLICIES[policy], info)
                        keep = ep.keep_per_destination(raw, idx, spec, thr, owner)
                    subs = idx[keep]
                    tokens = torch.arange(x.shape[0], device=device).repeat_interleave(idx.shape[1])[keep.flatten()]
                    order = torch.argsort(subs, stable=True)
                    subs, tokens = subs[order], tokens[order]
                    post_subs = torch.bincount(subs, minlength=E * P)
                    per_rank_ms, per_rank_load = [], []
                    for d in range(N):
                        lo, hi = ranges[d], ranges[d + 1]
                        sel = (subs >= lo) & (subs < hi)
                        xs = x[tokens[sel]]
                        counts = post_subs[lo:hi].tolist()
                        offs = post_subs[lo:hi].cumsum(0).to(torch.int32)
                        wgu, wdn = weights_by_rank[d]
                        per_rank_ms.append(time_ms(lambda: run_local(xs, offs, counts, wgu, wdn), device))
                        per_rank_load.append(int(sel.sum().item()))
                    pre = [int(v) for v in torch.zeros(N, device=device, dtype=torch.long).index_add_(0, owner, pre_subs).tolist()]
                    row = dict(routing=routing, ranks=N, mode=mode, policy=policy, threshold=base.tolist(),
                               load_before=pre, load_after=per_rank_load, rank_ms=per_rank_ms,
                               straggler_ms=max(per_rank_ms), mean_ms=statistics.mean(per_rank_ms),
                               drop_rate=1 - sum(per_rank_load) / sum(pre),
                               imbalance_before=max(pre) / (sum(pre) / N))
                    rows.append(row)
                    print(f"{routing:9s} N={N} {mode} {policy:12s} straggler {row['straggler_ms']:.3f} ms  "
                          f"drop {row['drop_rate']:.3f}  max load {max(per_rank_load)}", flush=True)
                del weights_by_rank
    return kernel, rows


def table(rows) -> str:
    lines = ["| routing | N | rule | imbalance max/mean | policy | drop rate | max rank load | straggler ms | "
             "straggler vs uniform | mean rank ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    uni = {(r["routing"], r["ranks"], r["mode"]): r["straggler_ms"] for r in rows if r["policy"] == "uniform"}
    for r in rows:
        ref = uni[(r["routing"], r["ranks"], r["mode"])]
        lines.append(f"| {r['routing']} | {r['ranks']} | {r['mode']} | {r['imbalance_before']:.2f} | {r['policy']} | "
                     f"{r['drop_rate']:.3f} | {max(r['load_after'])} | {r['straggler_ms']:.3f} | "
                     f"{r['straggler_ms'] / ref:.3f} | {r['mean_ms']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/ep_straggler.json")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke run of the script")
    args = ap.parse_args()
    if args.small:
        global H, I, REPS
        H, I, REPS, args.tokens = 64, 32, 2, 64
    t0 = time.time()
    triton_check = check_triton_local(torch.device(args.device))
    print("triton local path check:", triton_check, flush=True)
    kernel, rows = run(args)
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
                torch=torch.__version__, kernel=kernel, shape=dict(H=H, I=I, E=E, K=K), tokens_per_rank=args.tokens,
                target_uniform_drop=DROP, triton_local_check=triton_check, reps=REPS, seconds=time.time() - t0,
                routing="synthetic: random router + per-expert logit bias (moderate std 0.5, skewed std 1.0)")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    text = table(rows)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(f"{json.dumps(meta)}\n\n{text}\n")
    print(json.dumps(meta))
    print(text)


if __name__ == "__main__":
    main()
