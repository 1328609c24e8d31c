"""How the timing method moves one MoE layer's number (GPU, bf16): do_bench against other ways to time it.

    PYTHONUNBUFFERED=1 python benchmarks/timing_check.py --cases OLMoE:4096,Qwen3-30B-A3B:4096

Per case, one CUDA graph of ``dispatch.moe_triton`` is timed five ways, medians in ms:
- do_bench: ``triton.testing.do_bench`` as moe_layer.py calls it (L2 flushed before every call, calls queued);
- no_flush: CUDA events around each call of a queued loop, no flush;
- flush_sync: flush, synchronize, then one event-timed call (nothing queued behind the flush);
- flush_wait: flush, then a ~200 µs sleep kernel, then the event-timed call (the call queued behind both);
- span: first kernel start to last kernel end of one profiled call (``gemm_sweep.timeline``).
Case "dense:N" times the floor's GEMM ceiling (a bf16 N x N x N cuBLAS product, as ``moe_layer.ceilings``
does) the same five ways, so a gap that both show is the timing's or the clocks', not the layer's.
Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_sweep import timeline  # noqa: E402
from layer_ab import build  # noqa: E402
from moe_layer import SHAPES, make_params, make_spec, median_ms, parse_cases, save_json  # noqa: E402

CALLS = 60


def events_ms(call, before=None, sync=False) -> float:
    """Median of CALLS event-timed calls, each after ``before()`` (and a synchronize when ``sync``)."""
    times = []
    for _ in range(CALLS):
        if before is not None:
            before()
        if sync:
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def layer_call(name, T):
    """One MoE layer's CUDA graph replay (the shipped switches)."""
    H, I, E, K, renorm, _ = SHAPES[name]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    graph, _, _ = build(x, params, spec, {})
    return graph.replay


def dense_call(n):
    """The floor's GEMM ceiling as moe_layer.ceilings times it: a bf16 n x n x n product (cuBLAS)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return lambda: a @ b


def run_case(name, T):
    call = dense_call(T) if name == "dense" else layer_call(name, T)
    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    flush = cache.zero_

    def flush_then_sleep():
        flush()
        torch.cuda._sleep(int(2e5 * 1.8))  # cycles: ~200 µs at ~1.8 GHz

    row = {"shape": name, "tokens": T,
           "do_bench": median_ms(call),
           "no_flush": events_ms(call),
           "flush_sync": events_ms(call, flush, sync=True),
           "flush_wait": events_ms(call, flush_then_sleep),
           "span": timeline(call)["span_us"] / 1e3}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="OLMoE:4096,Qwen3-30B-A3B:4096")
    ap.add_argument("--json", default="results/timing_check.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [run_case(name, T) for name, T in parse_cases(args.cases)]
    save_json(args.json, rows)
    cols = ["do_bench", "no_flush", "flush_sync", "flush_wait", "span"]
    print("| shape | tokens | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
