"""A/B of codegen switches on one MoE layer (GPU, bf16): CUDA-graph replay time and where it goes.

    PYTHONUNBUFFERED=1 python benchmarks/layer_ab.py --cases OLMoE:4096,Qwen3-30B-A3B:4096 \
        --variants stacked:STACK_GATE_UP=on,two:STACK_GATE_UP=off --json results/layer_ab.json

A variant is NAME:SETTING+SETTING, a setting ATTR=VALUE of ``codegen/dispatch.py`` (the module's switches:
TMA, STACK_GATE_UP, NESTED_HALVES, ...; on / off become True / False, digits integers). Per case every variant is built fresh (plans dropped), checked against
reference.moe (relative error < 1e-2) and timed as the median of do_bench over graph replays, rounds
alternating between variants so that clock drift falls on all of them alike; the kernel breakdown is
the median of profiled replays taken in alternating rounds as well (``profiled_rounds``), and the timeline of one
replay (``gemm_sweep.timeline``: span from the first kernel's start to the last one's end, idle = span - kernel
time). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_sweep import breakdown, timeline  # noqa: E402
from moe_layer import SHAPES, make_params, make_spec, median_ms, parse_cases, rel_err, save_json  # noqa: E402

from dsmoe_compiler.codegen import dispatch, reference  # noqa: E402


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """'base:SPLIT_TAILS=off,split:SPLIT_TAILS=on+COMBINE=atomic' -> [(name, {attr: value}), ...]."""
    out = []
    for item in text.split(","):
        name, _, settings = item.partition(":")
        pairs = [s.split("=", 1) for s in settings.split("+") if s]
        for attr, _ in pairs:
            if not hasattr(dispatch, attr):
                raise SystemExit(f"--variants: codegen/dispatch.py has no switch {attr!r}")
        out.append((name, {attr: _value(attr, value) for attr, value in pairs}))
    return out


def _value(attr: str, text: str):
    """The switch's own type: booleans from on / off, integers from digits, else the text (e.g. TMA=off)."""
    if isinstance(getattr(dispatch, attr), bool):
        return text == "on"
    return int(text) if text.isdigit() else text


def build(x, params, spec, settings):
    """A CUDA graph of one layer call under the variant's switches (their values kept for the replays)."""
    saved = {attr: getattr(dispatch, attr) for attr in settings}
    for attr, value in settings.items():
        setattr(dispatch, attr, value)
    dispatch._PLANS = {}
    try:
        fn = lambda: dispatch.moe_triton(x, params, spec)  # noqa: E731
        out = fn()
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = fn()
    finally:
        for attr, value in saved.items():
            setattr(dispatch, attr, value)
    return graph, out, graph_out


def run_case(name, T, variants, rounds):
    H, I, E, K, renorm, shared = SHAPES[name]
    spec = make_spec(H, I, E, K, renorm, shared=shared)
    params = make_params(spec)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ref = reference.moe(x, params, spec)
    built = {}
    for vname, settings in variants:
        try:
            graph, out, graph_out = build(x, params, spec, settings)
        except Exception as e:  # e.g. a tile out of shared memory: report it, time the other variants
            print(f"{name} {T} {vname}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        graph.replay()
        torch.cuda.synchronize()
        errs = rel_err(out, ref), rel_err(graph_out, ref)
        if not max(errs) < 1e-2:
            raise SystemExit(f"{name} {T} {vname}: relative error {errs} against reference.moe")
        built[vname] = graph, max(errs)
    times = {v: [] for v in built}
    for _ in range(rounds):
        for vname, (graph, _) in built.items():
            times[vname].append(median_ms(graph.replay))
    profiles = profiled_rounds({v: graph for v, (graph, _) in built.items()}, rounds)
    rows = []
    for vname, (graph, err) in built.items():
        ms = sorted(times[vname])[len(times[vname]) // 2]
        rows.append({"shape": name, "tokens": T, "variant": vname, "settings": dict(variants)[vname], "ms": ms,
                     "rounds": times[vname], "rel_err": err, "breakdown": profiles[vname],
                     "timeline": timeline(graph)})
        print(json.dumps({k: rows[-1][k] for k in ("shape", "tokens", "variant", "ms", "rel_err")}), flush=True)
        tl = rows[-1]["timeline"]
        print(f"  one replay, µs from its first kernel: span {tl['span_us']:.1f}, idle {tl['idle_us']:.1f}: "
              + ", ".join(f"{k['name'].split('_kernel')[0][:24]} @{k['start_us']:.1f}+{k['us']:.1f}"
                          for k in tl["kernels"]), flush=True)
    return rows


def profiled_rounds(graphs: dict, rounds: int) -> dict:
    """Per variant, each kernel's median time over ``rounds`` profiled replays, the variants alternating, after
    one discarded profile. Profiled one variant after the other, the variant profiled first read slower kernels in
    every fifth-session run (the same gate/up code 0.529 ms profiled first, 0.471 ms second,
    results/h200/layer_ab_epilogue.json)."""
    breakdown(next(iter(graphs.values())))
    seen = {v: [] for v in graphs}
    for _ in range(rounds):
        for vname, graph in graphs.items():
            seen[vname].append(breakdown(graph))
    out = {}
    for vname, samples in seen.items():
        names = dict.fromkeys(k for sample in samples for k in sample)
        medians = {k: sorted(s.get(k, 0.0) for s in samples)[len(samples) // 2] for k in names}
        out[vname] = dict(sorted(medians.items(), key=lambda kv: -kv[1]))
    return out


def table(rows) -> str:
    lines = ["| shape | tokens | variant | ms | vs first | span / idle (µs) | kernels (ms) |",
             "|---|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        base = first.setdefault((r["shape"], r["tokens"]), r["ms"])
        kernels = ", ".join(f"{k.split('_kernel')[0]} {v:.3f}" for k, v in r["breakdown"].items())
        tl = r.get("timeline")
        span = f"{tl['span_us']:.0f} / {tl['idle_us']:.0f}" if tl else "–"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['ms']:.3f} | {base / r['ms']:.3f}x "
                     f"| {span} | {kernels} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="OLMoE:4096,DeepSeek-V2-Lite:4096,Qwen3-30B-A3B:4096,Mixtral:4096")
    ap.add_argument("--variants", required=True, help="NAME:ATTR=VALUE+ATTR=VALUE,... (codegen/dispatch.py switches)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per variant, alternating")
    ap.add_argument("--json", default="results/layer_ab.json")
    ap.add_argument("--show", default=None, help="print the table of a saved JSON and exit")
    args = ap.parse_args()
    if args.show:
        return print(table(json.load(open(args.show))["rows"]))
    variants = parse_variants(args.variants)
    torch.manual_seed(0)
    start, rows = time.time(), []
    for name, tokens in parse_cases(args.cases):
        rows += run_case(name, tokens, variants, args.rounds)
        torch.cuda.empty_cache()
    save_json(args.json, rows, command=" ".join(sys.argv), seconds=time.time() - start)
    print(table(rows))
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
