"""Where a layer's GPU time goes, at full clocks: a layer_ab.py run's profiled kernels against the dense GEMM rate.

    python benchmarks/time_split.py --layers results/h200/layer_ab_tails.json --variant base \
        --timing results/h200/timing_check.json

No GPU needed: it reads two saved runs. The rate is the floor's 8192³ bf16 product over its profiled span
(``timing_check.py``'s "dense" row: the GPU at full clocks, as the profiled kernels are). Per case:
- pad: rows the grouped GEMMs multiply (each expert's rows rounded up to whole 128-row tiles) over the real
  rows, the mean over 10 uniform random routings (seeded);
- gate/up and down: measured ms / ideal ms at that rate = the share of it, and in brackets the share on
  the padded rows;
- combine, and everything else (router GEMM, routing, alignment; DeepSeek's shared experts);
- the replay's span.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name: (hidden, intermediate, experts, top-k), as moe_layer.SHAPES (which needs a GPU to import)
    "Mixtral": (4096, 14336, 8, 2), "OLMoE": (2048, 1024, 64, 8), "DeepSeek-V2-Lite": (2048, 1408, 64, 6),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
}
TILE_M = 128


def padded_rows(T: int, E: int, K: int, rng, samples: int = 10) -> float:
    """Mean over random routings (K distinct experts per token) of rows in whole tiles over real rows."""
    ratios = []
    for _ in range(samples):
        counts = np.bincount(np.argsort(rng.random((T, E)), axis=1)[:, :K].ravel(), minlength=E)
        ratios.append((np.ceil(counts / TILE_M) * TILE_M).sum() / (T * K))
    return float(np.mean(ratios))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="results/h200/layer_ab_tails.json")
    ap.add_argument("--variant", default="base")
    ap.add_argument("--timing", default="results/h200/timing_check.json")
    args = ap.parse_args()
    dense = next(r for r in json.load(open(args.timing))["rows"] if r["shape"] == "dense")
    peak = 2 * dense["tokens"] ** 3 / (dense["span"] * 1e-3)
    rng = np.random.default_rng(0)
    print(f"dense rate {peak / 1e12:.0f} TFLOP/s (profiled span {dense['span']:.3f} ms)")
    print("| case | pad | gate/up | down | combine | rest | span |\n|---|---|---|---|---|---|---|")
    for r in json.load(open(args.layers))["rows"]:
        if r["variant"] != args.variant:
            continue
        H, I, E, K = SHAPES[r["shape"]]
        T, kernels = r["tokens"], r["breakdown"]
        pad = padded_rows(T, E, K, rng)
        cells = []
        for name, flops in (("gate_up_glu_kernel", 4 * T * K * H * I), ("down_weighted_kernel", 2 * T * K * H * I)):
            ideal = flops / peak * 1e3
            cells.append(f"{kernels[name]:.3f} / {ideal:.3f} = {ideal / kernels[name]:.0%} "
                         f"({ideal * pad / kernels[name]:.0%})")
        rest = sum(v for k, v in kernels.items() if k not in ("gate_up_glu_kernel", "down_weighted_kernel",
                                                              "combine_kernel"))
        print(f"| {r['shape']} {T} | {pad:.3f} | {cells[0]} | {cells[1]} | {kernels['combine_kernel']:.3f} "
              f"| {rest:.3f} | {r['timeline']['span_us'] / 1e3:.3f} |")


if __name__ == "__main__":
    main()
