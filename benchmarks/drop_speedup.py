"""Layer time against the measured compute drop rate (1T and 2T), on the GPU, in bf16.

    PYTHONUNBUFFERED=1 python benchmarks/drop_speedup.py --json results/drop_speedup.json

For each shape of benchmarks/moe_layer.py at 4096 and 16384 tokens: thresholds are fitted
(runtime/thresholds.py) on the normalised top-k scores of one batch to target 0, 10, 25, 40, 50 %
compute drop, the layer is timed (median of triton.testing.do_bench, CUDA-graph replay) on another
batch, and the drop rate actually measured there (reference.record_drops on the device) is printed
beside the speedup over our own no-drop layer and the ideal 1 / (1 - rate). 2T runs on Major/Minor
halves (partition 2, partial). Prints a table last and writes JSON.

Decode sizes (``--tokens 16,64,256``): the thresholds are fitted on a calibration batch of at least 4096 tokens
(as a server calibrates offline), and the "weights read" column is the share of the experts' weight bytes that the
kept pairs touch, against the no-drop layer's: at a few tokens the layer reads weights more than it multiplies,
so that share, not the compute drop rate, bounds what dropping can gain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from moe_layer import DEV, SHAPES, make_params, make_spec, median_ms  # noqa: E402

from dsmoe_compiler.codegen import dispatch, reference  # noqa: E402
from dsmoe_compiler.ir import DropSpec  # noqa: E402
from dsmoe_compiler.runtime import thresholds as fit  # noqa: E402

RATES = (0.0, 0.10, 0.25, 0.40, 0.50)
CALIBRATION_TOKENS = 4096


def weights_read(x, params, spec, thresholds=None) -> int:
    """Sub-experts (expert halves under P = 2) that at least one kept pair touches, in units of a half expert."""
    _, weights, index = reference.route(x, params, spec)
    keep = reference.keep_mask(weights, spec, thresholds) if spec.drop.mode != "none" else None
    if spec.transform == "partial" and spec.partition > 1:
        index, weights = reference.partial_transform(index, weights, spec.partition)
    touched = index if keep is None else index[keep]
    return touched.unique().numel() * (2 // spec.partition)


def graph_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (our forward has no host synchronisation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def scores_of(x, params, spec):
    weights, _ = dispatch.route(x, params, spec)
    return reference.normalized_scores(weights)


def thresholds_for(samples, rate, mode):
    """(t_major, t_minor) fitted to the target compute drop rate (0: keep everything), and as a device tensor."""
    t_major, t_minor = fit.fit_thresholds(samples, rate, mode)["layer"] if rate else (0.0, 0.0)
    return (t_major, t_minor), torch.tensor([t_major, t_minor], device=DEV)


def run(name, H, I, E, K, renorm, shared, tokens):
    base = make_spec(H, I, E, K, renorm, shared=shared)
    params = make_params(base)
    calib = torch.randn(max(tokens, CALIBRATION_TOKENS), H, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(tokens, H, device=DEV, dtype=torch.bfloat16)
    no_drop = graph_ms(lambda: dispatch.moe_triton(x, params, base))
    read_no_drop = weights_read(x, params, base)
    share = K * I / (K * I + (shared or 0))
    samples = {"layer": (scores_of(calib, params, base).float().cpu(), share)}
    rows = []
    for mode in ("1t", "2t"):
        for target in RATES:
            spec = base.replace(drop=DropSpec(mode=mode),  # the shared experts are inside the op (spec.shared)
                                **({"partition": 2} if mode == "2t" else {}))
            (t_major, t_minor), thr = thresholds_for(samples, target, mode)
            stats = torch.zeros(2, dtype=torch.float64, device=DEV)
            dispatch.moe_triton(x, params, spec, thresholds=thr, stats=stats)
            rate = (stats[0] / stats[1]).item()
            ms = graph_ms(lambda: dispatch.moe_triton(x, params, spec, thresholds=thr))
            row = {"shape": name, "tokens": tokens, "mode": mode, "target": target, "measured_rate": rate,
                   "t_major": t_major, "t_minor": t_minor, "ms": ms, "no_drop_ms": no_drop,
                   "speedup": no_drop / ms, "ideal": 1 / (1 - rate),
                   "weights_read": weights_read(x, params, spec, thr) / read_no_drop}
            print(f"{name:18s} T={tokens:6d} {mode} target={target:.2f} measured={rate:.3f} {ms:.3f} ms "
                  f"speedup={no_drop / ms:.3f} ideal={1 / (1 - rate):.3f} weights read {row['weights_read']:.3f}",
                  flush=True)
            rows.append(row)
    return rows


def profile(name, tokens, rate):
    """Per-kernel GPU time of 2T at one drop rate, P = 2 grouped with nested halves and as two groups."""
    from gemm_sweep import breakdown

    H, I, E, K, renorm, shared = SHAPES[name]
    base = make_spec(H, I, E, K, renorm, shared=shared)
    params = make_params(base)
    x = torch.randn(tokens, H, device=DEV, dtype=torch.bfloat16)
    spec = base.replace(drop=DropSpec(mode="2t"), partition=2)
    samples = {"layer": (scores_of(x, params, base).float().cpu(), K * I / (K * I + (shared or 0)))}
    _, thr = thresholds_for(samples, rate, "2t")
    for nested in (True, False):
        dispatch.NESTED_HALVES, dispatch._PLANS = nested, {}
        fn = lambda: dispatch.moe_triton(x, params, spec, thresholds=thr)  # noqa: E731
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = breakdown(graph)
        print(f"{name} {tokens} 2t {rate:.2f} nested={nested}: layer {median_ms(graph.replay):.3f} ms; "
              + ", ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)


def table(rows) -> str:
    head = "| shape | tokens | mode | target | measured rate | ms | speedup vs our no-drop | ideal | weights read |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['target']:.2f} | {r['measured_rate']:.3f} | "
                     f"{r['ms']:.3f} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r.get('weights_read', float('nan')):.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/drop_speedup.json")
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--profile", default=None, help="SHAPE:TOKENS:RATE, e.g. OLMoE:16384:0.1: per-kernel times")
    args = parser.parse_args()
    if args.profile:
        name, tokens, rate = args.profile.split(":")
        return profile(name, int(tokens), float(rate))
    torch.manual_seed(0)
    rows = []
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    for name in args.shapes.split(","):
        for tokens in map(int, args.tokens.split(",")):
            rows += run(name, *SHAPES[name], tokens)
            torch.cuda.empty_cache()
            with open(args.json, "w") as f:  # after every shape: a run cut short keeps what it measured
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f,
                          indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
