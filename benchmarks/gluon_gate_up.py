"""The Gluon gate/up kernel (codegen/gluon_gate_up.py) against the Triton one, alone, on a Hopper GPU (bf16).

    PYTHONUNBUFFERED=1 python benchmarks/gluon_gate_up.py --json results/h200/gluon_gate_up.json

Per (shape, tokens): the routing and alignment of a real layer call, then h from the shipped Triton kernel
(persistent, stacked, 128 x (2 x 128) x 64 tiles, 8 warps, 4 stages: the prefill tile the autotuner picks)
and from the Gluon kernel (its tile table kernel included in its time), each output poisoned with NaN first
and compared with the Triton h (rel. err.), median ms of ``do_bench``. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_sweep import launch  # noqa: E402
from moe_layer import SHAPES, make_params, make_spec, rel_err  # noqa: E402

from dsmoe_compiler.codegen import dispatch  # noqa: E402

CASES = [("OLMoE", 4096), ("DeepSeek-V2-Lite", 4096), ("Qwen3-30B-A3B", 4096), ("Mixtral", 4096),
         ("OLMoE", 16384), ("Qwen3-30B-A3B", 16384)]
TRITON_TILE = (128, 128, 64, 8, 4)
BASE = dict(BLOCK_K=64, STAGES=4, GROUP_SIZE_M=8, MMA_REGS=232, LOADER_REGS=40, EPI_BLOCKED=False, PREFETCH=False)
VARIANTS = {"s4": BASE, "s3": dict(BASE, STAGES=3), "pre": dict(BASE, PREFETCH=True),
            "epi": dict(BASE, EPI_BLOCKED=True), "epipre": dict(BASE, EPI_BLOCKED=True, PREFETCH=True),
            "epipre_r224": dict(BASE, EPI_BLOCKED=True, PREFETCH=True, MMA_REGS=224, LOADER_REGS=56),
            "k128": dict(BASE, BLOCK_K=128, STAGES=2)}


def ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def gluon_launcher(x, w, h, sorted_ids, counts, E, I, H, top_k, pairs, variant):
    from dsmoe_compiler.codegen.gluon_gate_up import gluon_gate_up_kernel, tile_table_kernel
    max_tiles = triton.cdiv(pairs, 128) + E
    table = torch.empty(3 * max_tiles, dtype=torch.int32, device=x.device)
    num_tiles = torch.empty(1, dtype=torch.int32, device=x.device)
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    w2 = w.view(E * 2 * I, H)

    def run():
        tile_table_kernel[(triton.cdiv(max_tiles, 64),)](counts, table, num_tiles, E, max_tiles, BLOCK_M=128,
                                                         BLOCK_SUBS=triton.next_power_of_2(E), BLOCK_T=64)
        gluon_gate_up_kernel[(programs,)](x, w2, h, sorted_ids, table, num_tiles, E, I, H, top_k, x.stride(0),
                                          w2.stride(0), h.stride(0), programs, BLOCK_N=128,
                                          num_warps=4, maxnreg=168, **variant)
    return run


def case(name, T, variants):
    H, I, E, K, renorm, _ = SHAPES[name]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    dispatch._PLANS = {}
    dispatch.moe_triton(x, params, spec)
    plan = next(p for p in dispatch._PLANS.values() if p.T == T)
    weights, index = dispatch.route(x, params, spec)
    sorted_ids, counts = dispatch.align(index, None, plan.num_subs, 1)
    pairs, gate_up = plan.pairs, params[1]
    assert gate_up.shape == (E, 2 * I, H) and gate_up.is_contiguous()
    h_ref = torch.full((pairs, I), float("nan"), device="cuda", dtype=torch.bfloat16)
    cx = {k: v for k, v in plan.gate_up.constexprs.items() if k not in ("PERSISTENT", "STACKED")}
    triton_run = launch(plan.gate_up.kernel, plan.gate_up.grid_fn, (x, gate_up, gate_up, gate_up, h_ref, sorted_ids,
                                                                    counts), plan.gate_up.scalars, cx, TRITON_TILE,
                        PERSISTENT=True, STACKED=True)
    triton_run()
    flops = 4 * pairs * H * I
    row = {"shape": name, "tokens": T, "triton_ms": ms(triton_run), "triton_nan": bool(h_ref.isnan().any())}
    row["triton_tflops"] = flops / row["triton_ms"] / 1e9
    for vname in variants:
        h = torch.full_like(h_ref, float("nan"))
        try:
            run = gluon_launcher(x, gate_up, h, sorted_ids, counts, E, I, H, K, pairs, VARIANTS[vname])
            run()
            torch.cuda.synchronize()
            err = rel_err(h, h_ref)
            row[vname] = {"ms": ms(run), "rel_err": err, "nan": bool(h.isnan().any())}
            row[vname]["tflops"] = flops / row[vname]["ms"] / 1e9
        except Exception as e:  # a compile or launch failure is a result too
            row[vname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
    return row


def table(rows, variants):
    head = "| shape | tokens | Triton ms (TFLOP/s) | " + " | ".join(f"Gluon {v} ms (rel err)" for v in variants) + " |"
    print(head)
    print("|" + "---|" * (3 + len(variants)))
    for r in rows:
        cells = []
        for v in variants:
            e = r[v]
            cells.append(e["error"][:60] if "error" in e else f"{e['ms']:.3f} ({e['rel_err']:.1e}{' NaN' if e['nan'] else ''})")
        print(f"| {r['shape']} | {r['tokens']} | {r['triton_ms']:.3f} ({r['triton_tflops']:.0f}) | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/gluon_gate_up.json")
    ap.add_argument("--cases", default=None, help="e.g. OLMoE:4096,Qwen3-30B-A3B:4096")
    ap.add_argument("--variants", default="s4,pre,epi,epipre")
    args = ap.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")] if args.cases else CASES
    variants = args.variants.split(",")
    dispatch._ensure_allocator()
    rows = [case(n, t, variants) for n, t in cases]
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows}, f, indent=1)
    table(rows, variants)


if __name__ == "__main__":
    main()
