"""One MoE layer in fp32 on the GPU: how the grouped GEMMs' fp32 products trade precision for time.

    PYTHONUNBUFFERED=1 python benchmarks/fp32_layer.py --json results/h200/fp32_layer.json

For each torch setting of fp32 matmuls (``torch.backends.cuda.matmul.fp32_precision``: "ieee", torch's default,
and "tf32") the table gives ours, whose ``tl.dot`` input precision follows it (``dispatch.dot_precision``: "tf32x3"
without TF32, "tf32" with it), and transformers' OLMoE experts
(eager, grouped_mm, grouped_mm under inductor) in the same setting: ms (median of do_bench) and the relative error
against fp64 experts on the same routing (the fp32 router GEMM's, so no top-k choice differs). Prints a table last
and writes JSON.
"""

from __future__ import annotations

import argparse

import torch
from moe_layer import (SHAPES, make_params, make_spec, median_ms, parse_cases, print_markdown, rel_err, save_json,
                       transformers_layer)

from dsmoe_compiler.codegen import dispatch, reference

SETTINGS = ("ieee", "tf32")


def run_case(name: str, tokens: int, setting: str, skip_eager_at: int) -> list[dict]:
    H, I, E, K, renorm, _ = SHAPES[name]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec, torch.float32)
    x = torch.randn(tokens, H, device="cuda")
    torch.backends.cuda.matmul.fp32_precision = setting
    _, weights, index = reference.route(x, params, spec)
    want = reference.experts(x.double(), index, weights.double(), [p.double() for p in params], spec)
    call = lambda: dispatch.moe_triton(x, params, spec)  # noqa: E731
    rows = [_timed(name, tokens, setting, f"ours ({dispatch.dot_precision(x.dtype)})", call, want)]
    for impl in ("eager", "grouped_mm", "grouped_mm+inductor"):
        if impl == "eager" and tokens >= skip_eager_at:
            continue
        try:
            layer = transformers_layer(H, I, E, K, renorm, params, impl.split("+")[0], dtype=torch.float32)
            layer = torch.compile(layer) if impl.endswith("inductor") else layer
            rows.append(_timed(name, tokens, setting, f"hf {impl}", lambda: layer(x), want))
        except Exception as error:  # a peer that does not run in fp32 here: say so, keep the others
            rows.append({"shape": name, "tokens": tokens, "setting": setting, "column": f"hf {impl}",
                         "error": repr(error)[:200]})
            print(rows[-1], flush=True)
    return rows


def _timed(name, tokens, setting, column, call, want) -> dict:
    row = {"shape": name, "tokens": tokens, "setting": setting, "column": column}
    try:
        row["rel_err"] = rel_err(call(), want)
        row["ms"] = median_ms(call)
    except Exception as error:  # e.g. a tile that does not fit: recorded, not hidden
        row["error"] = repr(error)[:200]
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="OLMoE:16,OLMoE:4096,Qwen3-30B-A3B:4096,Mixtral:4096")
    ap.add_argument("--skip-eager-at", type=int, default=4096)
    ap.add_argument("--json", default="results/h200/fp32_layer.json")
    args = ap.parse_args()
    before = torch.backends.cuda.matmul.fp32_precision
    rows = []
    try:
        for name, tokens in parse_cases(args.cases):
            for setting in SETTINGS:
                rows += run_case(name, tokens, setting, args.skip_eager_at)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    save_json(args.json, rows, command="python benchmarks/fp32_layer.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    print_markdown("fp32 MoE layer: ms (rel. err. against fp64 experts, same routing)",
                   ["shape", "tokens", "torch fp32 setting", "column", "ms", "rel. err."],
                   [[r["shape"], str(r["tokens"]), r["setting"], r["column"],
                     f"{r['ms']:.3f}" if "ms" in r else r.get("error", "–")[:60],
                     f"{r['rel_err']:.1e}" if "rel_err" in r else "–"] for r in rows])


if __name__ == "__main__":
    main()
