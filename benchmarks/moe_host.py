"""Host time per call of the Triton MoE operator (OLMoE-shaped layer, bf16, on the GPU).

    PYTHONUNBUFFERED=1 python benchmarks/moe_host.py --json results/moe_host.json [--baseline DIR]

Host time = wall time of 200 back-to-back calls / 200, measured while the GPU keeps up (no sync inside;
synchronised before and after). Variants: ``replay`` (codegen/dispatch.py as shipped: recorded kernels
replayed with raw pointers), ``triton launch`` (the same plan, every kernel launched through Triton's
own ``kernel[grid](...)`` path: ``dispatch.FAST_LAUNCH = False``), ``graph`` (calls of at most
``dispatch.GRAPH_MAX_PAIRS`` pairs as one CUDA graph replay of the operator's launches, the default;
``replay`` has it off), ``custom op`` (the default path, called as the compiled graph calls it:
``torch.ops.dualsparse.moe``), and, with ``--baseline DIR`` holding the earlier
``old_dispatch.py``, ``baseline`` (the dispatch before the host-time work). Cases without and with
2T dropping (P = 2, thresholds and statistics on the device). Also the GPU time (median of
``triton.testing.do_bench``) to show the kernels did not change, the cost of single pieces, and the
profiler's top host-side ops of the replay path. Every variant is checked against reference.moe
(bf16, relative error < 1e-2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from triton.testing import do_bench

import dsmoe_compiler  # noqa: F401  (registers torch.ops.dualsparse)
from dsmoe_compiler.codegen import dispatch, reference
from dsmoe_compiler.ir import DropSpec, ExpertsSpec, MoESpec, RoutingSpec

H, I, E, K = 2048, 1024, 64, 8
CALLS = 200


def host_us(fn, calls=CALLS) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def gpu_ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make(drop: bool):
    slots = ("router_weight", "gate_up", "down")
    spec = MoESpec(name="olmoe", num_experts=E, top_k=K, hidden=H, intermediate=I, routing=RoutingSpec(),
                   experts=ExpertsSpec(), slots=slots,
                   **({"partition": 2, "drop": DropSpec(mode="2t")} if drop else {}))
    g = torch.Generator("cuda").manual_seed(0)
    rnd = lambda *s, scale: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    params = [rnd(E, H, scale=0.02), rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5)]
    return spec, params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/moe_host.json")
    parser.add_argument("--baseline", default=None, help="folder with the earlier old_dispatch.py")
    args = parser.parse_args()
    baseline = None
    if args.baseline:
        sys.path.insert(0, args.baseline)
        import old_dispatch as baseline  # noqa: E402

    rows, pieces = [], {}
    graph_max_pairs = dispatch.GRAPH_MAX_PAIRS
    thresholds = torch.tensor([0.08, 0.16], device="cuda")
    for drop in (False, True):
        spec, params = make(drop)
        for T in (64, 4096):
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            stats = torch.zeros(2, dtype=torch.float64, device="cuda")
            kw = {"thresholds": thresholds, "stats": stats} if drop else {}
            ref = reference.moe(x, params, spec, thresholds if drop else None)
            variants = {"replay": lambda: dispatch.moe_triton(x, params, spec, **kw)}
            variants["graph"] = variants["replay"]
            variants["triton launch"] = variants["replay"]
            if baseline is not None:
                variants["baseline"] = lambda: baseline.moe_triton(x, params, spec, **kw)
            if not drop:
                spec_json = spec.to_json()
                variants["custom op"] = lambda: torch.ops.dualsparse.moe(x, params, spec_json, "triton")

                def no_grad_op():
                    with torch.no_grad():
                        return torch.ops.dualsparse.moe(x, params, spec_json, "triton")
                variants["custom op no_grad"] = no_grad_op
            row = {"case": f"T={T}" + (" 2T P=2" if drop else ""), "tokens": T, "drop": drop}
            for name, fn in variants.items():
                dispatch.FAST_LAUNCH = name != "triton launch"
                # every variant builds its own plan: only "replay" turns the operator's own CUDA graph off
                dispatch._PLANS, dispatch.GRAPH_MAX_PAIRS = {}, 0 if name == "replay" else graph_max_pairs
                out = fn()
                fn()  # second call: the plan's kernels are recorded
                row[name + " err"] = rel(out, ref)
                assert row[name + " err"] < 1e-2, (row, name)
                row[name + " host us"] = host_us(fn)
                row[name + " gpu ms"] = gpu_ms(fn)
            dispatch.FAST_LAUNCH, dispatch.GRAPH_MAX_PAIRS = True, graph_max_pairs
            if drop:  # statistics equal to the reference's for one call
                s_ref = torch.zeros(2, dtype=torch.float64, device="cuda")
                _, w, _ = reference.route(x, params, spec)
                reference.record_drops(s_ref, reference.keep_mask(w, spec, thresholds), spec)
                stats.zero_()
                dispatch.moe_triton(x, params, spec, **kw)
                row["stats equal"] = bool(torch.equal(stats, s_ref))
                row["drop rate"] = (s_ref[0] / s_ref[1]).item()
            rows.append(row)
            print(row, flush=True)
            if T == 64 and not drop:
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                for _ in range(200):
                    variants["custom op"]()
                prof.disable()
                torch.cuda.synchronize()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
                pieces["cProfile custom op (200 calls)"] = text.getvalue()
                print(text.getvalue()[-5000:], flush=True)
                dispatch.moe_triton(x, params, spec)
                dispatch.moe_triton(x, params, spec)  # record again after the "triton launch" variant
                logits = reference.router_logits(x, params, spec)
                plan = next(p for p in dispatch._PLANS.values() if p.spec is spec and p.T == T)
                pieces["router F.linear"] = host_us(lambda: reference.router_logits(x, params, spec))
                pieces["torch.empty (1 MiB)"] = host_us(lambda: torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
                pieces["_signature (12 inputs)"] = host_us(
                    lambda: dispatch._signature((x, *params, None, None, None, logits, None, None, None, None, None)))
                out = torch.empty_like(x)
                comb = plan.combine
                y = torch.zeros(plan.pairs, H, device="cuda", dtype=torch.bfloat16)
                cnt = torch.zeros(plan.num_subs, device="cuda", dtype=torch.int32)
                stream = torch._C._cuda_getCurrentRawStream(0)
                pieces["one replayed launch (combine)"] = host_us(
                    lambda: comb.replay(stream, (y.data_ptr(), cnt.data_ptr(), out.data_ptr())))
                pieces["one Triton launch (combine)"] = host_us(
                    lambda: comb.kernel[comb.grid_fn](y, cnt, out, *comb.scalars, **comb.constexprs))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(20):
                        dispatch.moe_triton(x, params, spec)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
                pieces["profile"] = table
                print(table, flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "rows": rows, "pieces": pieces}, f, indent=1)
    print("| piece | host us |\n|---|---|")
    for k, v in pieces.items():
        if isinstance(v, float):
            print(f"| {k} | {v:.1f} |")
    cols = ["baseline", "triton launch", "replay", "graph", "custom op", "custom op no_grad"]
    print("| case | " + " | ".join(f"{c} host us" for c in cols) + " | baseline gpu ms | replay gpu ms |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        vals = " | ".join(f"{r[c + ' host us']:.0f}" if c + " host us" in r else "-" for c in cols)
        base = f"{r['baseline gpu ms']:.3f}" if "baseline gpu ms" in r else "-"
        print(f"| {r['case']} | {vals} | {base} | {r['replay gpu ms']:.3f} |")


if __name__ == "__main__":
    main()
