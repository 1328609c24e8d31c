"""Where the MoE layer's time goes, and which tile configs the two grouped GEMMs want (GPU, bf16).

    PYTHONUNBUFFERED=1 python benchmarks/gemm_sweep.py --json results/gemm_sweep.json

Per (shape, tokens): (1) a kernel-by-kernel breakdown of one CUDA-graph replay of the whole layer
(torch.profiler) with every config launched one program per tile ("tile") and with the default
launch shapes ("auto": prefill tiles persistent, codegen/schedule.py); (2) each grouped GEMM alone
over a list of tile configs, each launched one program per tile and persistent, gate/up also with
the fused weight as two operands or stacked, weights through tensor descriptors where the GPU has
them (``--pointers``: plain loads), in TFLOP/s; every config's output is checked against a reference
launch (rel. err. < 1e-2).
Prints tables last and writes JSON. Used to choose the autotuning lists in codegen/.

A/B runs of a few tiles (the form the second H200 session used, results/h200/gemm_sweep_warps.*):

    python benchmarks/gemm_sweep.py --cases OLMoE:4096 --gemms-only --quick --top 6 \
        --gate-up 128x128x64x16x4,256x128x64x16x3 --down 128x256x64x16x4 --variants persistent+stacked

(--quick: the kernels' own prefill tiles, which the extra tiles join; a sixth number is GROUP_SIZE_M.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import SHAPES, make_params, make_spec, parse_cases, rel_err, save_json  # noqa: E402

from dsmoe_compiler.codegen import dispatch  # noqa: E402
from dsmoe_compiler.codegen.down_weighted import down_weighted_kernel  # noqa: E402
from dsmoe_compiler.codegen.gate_up_glu import gate_up_glu_kernel  # noqa: E402
from dsmoe_compiler.codegen.schedule import as_persistent, is_prefill, tile_key  # noqa: E402

SWEEP_SHAPES = {**SHAPES, "LongCat-routed": (6144, 2048, 512, 8, False, None)}
"""The issue's shapes, and LongCat-Flash's routed experts (benchmarks/longcat_layer.py): 12 picks a token, a third of
them on its zero-computation experts, so about 8 on the 512 routed ones, ~64 rows an expert at 4096 tokens."""
CASES = [("Mixtral", 4096), ("OLMoE", 4096), ("OLMoE", 16384), ("DeepSeek-V2-Lite", 4096),
         ("Qwen3-30B-A3B", 4096), ("Qwen3-30B-A3B", 16384)]
# (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, warps, stages); gate/up: BLOCK_SIZE_N per accumulator
GATE_UP = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4), (128, 64, 64, 8, 5),
           (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 128, 8, 3), (256, 64, 64, 8, 3), (128, 128, 32, 8, 5)]
DOWN = [(64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 256, 32, 8, 5)]


GATE_UP_REFERENCE, DOWN_REFERENCE = GATE_UP[3], DOWN[3]  # every swept output is checked against these
LAYER, TOP = True, 5
LAUNCHES = {"tile": "one program per tile", "auto": "default launch shapes"}
VARIANTS = None  # --variants: launch flags to try instead of the default (one program per tile / persistent, x stacked)
FLAG_NAMES = {"persistent": "PERSISTENT", "stacked": "STACKED", "ctas2": "NUM_CTAS_2", "occ2": "PROGRAMS_X2"}
"""Variant flags: kernel constexprs, except two launch options. NUM_CTAS_2: each program a cluster of two CTAs
(Triton's num_ctas = 2, which does not compile our kernels on Triton 3.6: docs/kernel-experiments.md).
PROGRAMS_X2: a persistent launch of two programs per SM, so that tiles small enough for two CTAs on one SM
overlap one's epilogue with the other's K loop."""
LAUNCH_FLAGS = ("PERSISTENT", "NUM_CTAS_2", "PROGRAMS_X2")


def parse_tiles(text: str) -> list[tuple]:
    """'64x256x64x8x3,128x128x64x8x4' -> [(64, 256, 64, 8, 3), (128, 128, 64, 8, 4)]."""
    return [tuple(int(v) for v in t.split("x")) for t in text.split(",") if t]


def parse_variants(text: str) -> list[dict]:
    """'persistent+stacked,stacked' -> one flag dict per variant; flags not named are False."""
    return [{FLAG_NAMES[f]: True for f in v.split("+") if f} for v in text.split(",")]


def prefill_tiles(kernel) -> list[tuple]:
    """The kernel's own 16-bit prefill autotuning tiles (those tried from 64 rows per group up, fp32's ``wide`` ones
    left out), as sweep tuples, once each (gate/up lists them in both launch shapes; the sweep's variants set the
    shape)."""
    return list(dict.fromkeys(tile_key(c) for c in kernel.configs if is_prefill(c) and not c.kwargs.get("WIDE")))


def ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def breakdown(g) -> dict:
    """GPU time per kernel name (ms) in one replay of the CUDA graph g, summed over launches of a name."""
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0)
        if t > 0:
            out[ev.key[:40]] = t / 5 / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def timeline(call, replays: int = 5) -> dict:
    """One call (a CUDA graph's replay, or any function) on the GPU's clock: each kernel's start (µs from the
    first kernel's) and duration, the span (first start to last end) against the busy time (sum of durations),
    and the longest idle gaps between kernels, median call of ``replays`` profiled calls."""
    call = call.replay if hasattr(call, "replay") else call
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            call()
            torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    events = sorted((e.start_ns(), e.end_ns(), e.name()) for e in prof.profiler.kineto_results.events()
                    if e.device_type() == cuda and e.end_ns() > e.start_ns())
    per = len(events) // replays
    calls = [events[i * per:(i + 1) * per] for i in range(replays)]
    spans = sorted((c[-1][1] - c[0][0], sum(e - s for s, e, _ in c), c) for c in calls if c)
    span, busy, one = spans[len(spans) // 2]
    t0 = one[0][0]
    kernels = [{"name": n[:40], "start_us": (s - t0) / 1e3, "us": (e - s) / 1e3} for s, e, n in one]
    gaps = sorted(((b[0] - a[1]) / 1e3, a[2][:40], b[2][:40]) for a, b in zip(one, one[1:]))[::-1][:8]
    return {"span_us": span / 1e3, "busy_us": busy / 1e3, "idle_us": (span - busy) / 1e3, "kernels": kernels,
            "largest_gaps": [{"us": g, "after": a, "before": b} for g, a, b in gaps]}


def launch(kernel, grid_of, ptrs, scalars, constexprs, cfg, **flags):
    m, n, k, warps, stages, *group = cfg  # an optional sixth number: GROUP_SIZE_M (default 8)
    ctas = 2 if flags.pop("NUM_CTAS_2", False) else 1
    doubled = flags.pop("PROGRAMS_X2", False)
    meta = dict(constexprs, **flags, BLOCK_SIZE_M=m, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, GROUP_SIZE_M=(group or [8])[0],
                MIN_ROWS=0, MAX_ROWS=1 << 30)
    jit = kernel.fn if hasattr(kernel, "fn") else kernel
    grid = grid_of(meta)
    if doubled and meta["PERSISTENT"]:  # the NUM_PROGRAMS scalar and the grid both twice the SMs
        at = jit.arg_names.index("NUM_PROGRAMS") - len(ptrs)
        scalars = tuple(2 * v if i == at else v for i, v in enumerate(scalars))
        grid = (min(grid_of(dict(meta, PERSISTENT=False))[0], scalars[at]),)
    return lambda: jit[grid](*ptrs, *scalars, **meta, num_warps=warps, num_stages=stages, num_ctas=ctas)


def sweep_case(name, T):
    H, I, E, K, renorm, _ = SWEEP_SHAPES[name]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    row = {"shape": name, "tokens": T, "layer": {}, "breakdown": {}}
    all_configs = {k: list(k.configs) for k in (gate_up_glu_kernel, down_weighted_kernel)}
    for mode in ("tile", "auto") if LAYER else ("auto",):
        for kern, configs in all_configs.items():  # the default launch shapes, or all one program per tile
            kern.configs = configs if mode == "auto" else as_persistent(configs, False)
            kern.cache.clear()
        dispatch._PLANS = {}
        fn = lambda: dispatch.moe_triton(x, params, spec)  # noqa: E731
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        if LAYER:
            row["layer"][mode] = ms(g.replay)
            row["breakdown"][mode] = breakdown(g)
        row.setdefault("chosen", {})[mode] = [str(k.best_config) for k in all_configs]
    plan = next(p for p in dispatch._PLANS.values() if p.T == T)
    weights, index = dispatch.route(x, params, spec)
    sorted_ids, counts = dispatch.align(index, None, plan.num_subs, 1)
    pairs, c = plan.pairs, plan.c
    h = torch.randn(pairs, c, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(pairs, H, device="cuda", dtype=torch.bfloat16)
    gate_up, down = params[1], params[2]
    gu_ptrs = (x, gate_up, gate_up, gate_up, h, sorted_ids, counts, weights)  # routing weights: INPUT_WEIGHT only
    dn_ptrs = (h, down, down, weights, y, sorted_ids, counts)
    gu_const, dn_const = plan.gate_up.constexprs, plan.down.constexprs
    gu_flops, dn_flops = 4 * pairs * H * c, 2 * pairs * c * H

    # gate/up first: it leaves its reference h in place for the down GEMM
    row["gate_up"] = sweep_kernel("gate_up", plan.gate_up, gu_ptrs, gu_const, h, GATE_UP, gu_flops, GATE_UP_REFERENCE)
    row["down"] = sweep_kernel("down", plan.down, dn_ptrs, dn_const, y, DOWN, dn_flops, DOWN_REFERENCE)
    return row


def sweep_kernel(name, kernel, ptrs, constexprs, out, configs, flops, reference) -> list[dict]:
    """Time one grouped GEMM over configs x variants (one program per tile or persistent; gate/up: the fused
    weight as two operands or stacked); each output checked against the reference tile's first variant, which is
    left in ``out`` at the end."""
    grid = kernel.grid_fn
    variants = [dict(PERSISTENT=p) for p in (False, True)]
    if constexprs.get("STACKED"):
        variants = [dict(v, STACKED=s) for v in variants for s in (False, True)]
    if VARIANTS:  # only the flags this kernel has (STACKED is gate/up's); the reference variant first
        known = [f for f in FLAG_NAMES.values() if f in LAUNCH_FLAGS or f in constexprs]
        variants = [{f: v.get(f, False) for f in known} for v in VARIANTS]
        reference_flags = {f: False for f in LAUNCH_FLAGS if f in known}
        variants.insert(0, dict(variants[0], **reference_flags))
        variants = [dict(t) for t in dict.fromkeys(tuple(v.items()) for v in variants)]  # distinct, in order
    constexprs = {k: v for k, v in constexprs.items() if k not in variants[0]}
    launch(kernel.kernel, grid, ptrs, kernel.scalars, constexprs, reference, **variants[0])()
    ref = out.clone()
    results = []
    for cfg in configs:
        for flags in variants:
            out.fill_(float("nan"))
            try:
                run = launch(kernel.kernel, grid, ptrs, kernel.scalars, constexprs, cfg, **flags)
                run()
                err = rel_err(out, ref)
                t = ms(run)
            except Exception as e:  # out of shared memory / registers: record and go on
                print(f"{name} {cfg} {flags}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            results.append({"cfg": cfg, **flags, "desc": constexprs["W_DESC"], "ms": t,
                            "tflops": flops / t / 1e9, "rel_err": err})
    out.copy_(ref)
    return results


def report(rows):
    """The tables: per case, the layer under both launch-shape lists, its kernels, the five fastest configs."""
    for r in rows:
        print(f"\n## {r['shape']} {r['tokens']} tokens: layer "
              + " / ".join(f"{v:.3f} ms ({LAUNCHES[m]})" for m, v in r["layer"].items()))
        for mode in r["layer"]:
            print(f"  {mode:4s} " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"][mode].items()))
            print(f"       chosen: {r['chosen'][mode]}")
        for kern in ("gate_up", "down"):
            ok = [e for e in r[kern] if e["rel_err"] < 1e-2]
            bad = [e for e in r[kern] if not e["rel_err"] < 1e-2]
            for e in sorted(ok, key=lambda e: e["ms"])[:TOP]:
                flags = " ".join(f"{f.lower()}={int(e[f])}" for f in FLAG_NAMES.values() if e.get(f))
                print(f"  {kern:8s} {str(e['cfg']):24s} {flags:26s} {e['ms']:.3f} ms "
                      f"{e['tflops']:.0f} TFLOP/s")
            if bad:
                print(f"  {kern}: {len(bad)} configs WRONG: {[(e['cfg'], e['PERSISTENT'], e['rel_err']) for e in bad][:4]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/gemm_sweep.json")
    ap.add_argument("--cases", default=None, help="e.g. OLMoE:4096,Mixtral:4096")
    ap.add_argument("--pointers", action="store_true", help="weights through plain loads, not tensor descriptors")
    ap.add_argument("--show", default=None, help="print the tables of a saved JSON and exit")
    ap.add_argument("--quick", action="store_true", help="only the prefill tiles of the kernels' own autotuning lists")
    ap.add_argument("--gate-up", default=None,
                    help="gate/up tiles MxNxKxWARPSxSTAGES[xGROUP_SIZE_M], comma-separated (adds to --quick)")
    ap.add_argument("--down", default=None, help="down tiles, as --gate-up")
    ap.add_argument("--variants", default=None, help="launch flags per variant, e.g. persistent+stacked,stacked")
    ap.add_argument("--gemms-only", action="store_true", help="skip the whole-layer breakdown")
    ap.add_argument("--top", type=int, default=5, help="configs printed per GEMM")
    args = ap.parse_args()
    global GATE_UP, DOWN, VARIANTS, LAYER, TOP
    if args.quick:
        GATE_UP, DOWN = prefill_tiles(gate_up_glu_kernel), prefill_tiles(down_weighted_kernel)
    if args.gate_up or args.down:
        GATE_UP = (GATE_UP if args.quick else []) + parse_tiles(args.gate_up or "")
        DOWN = (DOWN if args.quick else []) + parse_tiles(args.down or "")
    VARIANTS = parse_variants(args.variants) if args.variants else None
    LAYER, TOP = not args.gemms_only, args.top
    if args.show:
        return report(json.load(open(args.show))["rows"])
    dispatch.TMA = "off" if args.pointers else "auto"
    cases = CASES if not args.cases else parse_cases(args.cases)
    start = time.time()
    torch.manual_seed(0)
    rows = []
    for name, T in cases:
        rows.append(sweep_case(name, T))
        print(json.dumps({k: rows[-1][k] for k in ("shape", "tokens", "layer")}), flush=True)
        torch.cuda.empty_cache()
    save_json(args.json, rows, seconds=time.time() - start)
    report(rows)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
