"""Our two grouped GEMMs against PyTorch's CUTLASS grouped GEMM (``torch._grouped_mm``), each alone (GPU, bf16).

    PYTHONUNBUFFERED=1 python benchmarks/grouped_mm_probe.py --json results/grouped_mm_probe.json

The question (issue 4): the fine-grained shapes at 4096 tokens miss 1.3x of the floor in the GEMMs themselves
(docs/kernel-experiments.md). CUTLASS's SM90 grouped GEMM is warp-specialised and launches 2-CTA clusters that
multicast the weight tile, the two things Triton 3.6 could not give our kernels. If it multiplies the same
sorted rows faster, a layer built around it (x gathered into sorted order, the GLU and the weighted combine as
separate passes) might win; this probe measures whether the GEMMs alone leave room for those extra passes.

Per case: the same routing and sorted pairs for every column. Ours: the shipped prefill tiles, persistent and
stacked (as ``gemm_sweep.py --quick --variants persistent+stacked``), fastest tile. grouped_mm: weights as the
model holds them ([E, 2I, H] and [E, H, I], read transposed) and as contiguous [E, K, N] copies. Extra passes a
grouped_mm layer would need: the x gather into sorted rows, and the GLU on the [pairs, 2I] product. Each output is
checked against ours (rel. err. < 1e-2). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm_sweep  # noqa: E402
from moe_layer import SHAPES, make_params, make_spec, parse_cases, print_markdown, rel_err, save_json  # noqa: E402

from dsmoe_compiler.codegen import dispatch  # noqa: E402
from dsmoe_compiler.codegen.down_weighted import down_weighted_kernel  # noqa: E402
from dsmoe_compiler.codegen.gate_up_glu import gate_up_glu_kernel  # noqa: E402

CASES = "OLMoE:4096,Qwen3-30B-A3B:4096,DeepSeek-V2-Lite:4096,Mixtral:4096,Qwen3-30B-A3B:16384"


def ours_fastest(name, plan, ptrs, constexprs, out, tiles, flops) -> dict:
    """The fastest shipped prefill tile of one of our GEMMs, persistent + stacked; its output left in ``out``."""
    rows = gemm_sweep.sweep_kernel(name, plan, ptrs, constexprs, out, tiles, flops, tiles[0])
    best = min((r for r in rows if r["rel_err"] < 1e-2 and r.get("PERSISTENT")), key=lambda r: r["ms"])
    return {"ms": best["ms"], "cfg": best["cfg"]}


def probe_case(name, T) -> dict:
    H, I, E, K, renorm, _ = SHAPES[name]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    dispatch._PLANS = {}
    dispatch.moe_triton(x, params, spec)  # builds the plan (and autotunes the layer once)
    plan = next(p for p in dispatch._PLANS.values() if p.T == T)
    weights, index = dispatch.route(x, params, spec)
    sorted_ids, counts = dispatch.align(index, None, plan.num_subs, 1)
    pairs, c = plan.pairs, plan.c
    gate_up, down = params[1], params[2]
    h = torch.empty(pairs, c, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(pairs, H, device="cuda", dtype=torch.bfloat16)
    gu_flops, dn_flops = 4 * pairs * H * c, 2 * pairs * c * H
    row = {"shape": name, "tokens": T}
    row["ours_gate_up"] = ours_fastest("gate_up", plan.gate_up, (x, gate_up, gate_up, gate_up, h, sorted_ids, counts,
                                                                  weights), plan.gate_up.constexprs, h,
                                       gemm_sweep.GATE_UP, gu_flops)
    h_ours = h.clone()
    row["ours_down"] = ours_fastest("down", plan.down, (h, down, down, weights, y, sorted_ids, counts),
                                    plan.down.constexprs, y, gemm_sweep.DOWN, dn_flops)
    y_ours = y.clone()  # rows by pair id, scaled by the routing weight

    pair = sorted_ids.long()
    token = pair // K
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x_sorted = x.index_select(0, token)
    row["gather_ms"] = gemm_sweep.ms(lambda: x.index_select(0, token))
    w_gu = {"model": gate_up.transpose(1, 2), "contig": gate_up.transpose(1, 2).contiguous()}
    w_dn = {"model": down.transpose(1, 2), "contig": down.transpose(1, 2).contiguous()}
    gu = torch._grouped_mm(x_sorted, w_gu["model"], offs=offs)
    row["glu_ms"] = gemm_sweep.ms(lambda: F.silu(gu[:, :I]) * gu[:, I:])
    row["gate_up_err"] = rel_err(F.silu(gu[:, :I].float()) * gu[:, I:].float(), h_ours)
    dn = torch._grouped_mm(h_ours, w_dn["model"], offs=offs)
    scale = weights.reshape(-1)[pair].float()[:, None]
    row["down_err"] = rel_err(dn.float() * scale, y_ours[pair])
    for layout in w_gu:
        row[f"gm_gate_up_{layout}"] = gemm_sweep.ms(lambda: torch._grouped_mm(x_sorted, w_gu[layout], offs=offs))
        row[f"gm_down_{layout}"] = gemm_sweep.ms(lambda: torch._grouped_mm(h_ours, w_dn[layout], offs=offs))
    for gemm, flops in (("gate_up", gu_flops), ("down", dn_flops)):
        times = {"ours": row[f"ours_{gemm}"]["ms"], "gm": row[f"gm_{gemm}_model"], "gm_contig": row[f"gm_{gemm}_contig"]}
        row[f"{gemm}_ms"] = times
        row[f"{gemm}_tflops"] = {k: flops / t / 1e9 for k, t in times.items()}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/grouped_mm_probe.json")
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()
    gemm_sweep.GATE_UP = gemm_sweep.prefill_tiles(gate_up_glu_kernel)
    gemm_sweep.DOWN = gemm_sweep.prefill_tiles(down_weighted_kernel)
    gemm_sweep.VARIANTS = gemm_sweep.parse_variants("persistent+stacked")
    dispatch.TMA = "auto"
    torch.manual_seed(0)
    start = time.time()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    dense_ms = gemm_sweep.ms(lambda: a @ a)
    rows = []
    for name, T in parse_cases(args.cases):
        rows.append(probe_case(name, T))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    save_json(args.json, rows, seconds=time.time() - start, dense_8192_ms=dense_ms,
              dense_tflops=2 * 8192 ** 3 / dense_ms / 1e9)
    print(f"\ndense 8192^3: {dense_ms:.3f} ms, {2 * 8192 ** 3 / dense_ms / 1e9:.0f} TFLOP/s")
    print_markdown("GEMMs alone, ms (TFLOP/s); grouped_mm on the model's [E, N, K] weights / contiguous [E, K, N]",
                   ["case", "ours gate/up", "gm gate/up", "gm gate/up contig", "ours down", "gm down",
                    "gm down contig", "x gather", "GLU pass", "err gu / dn"],
                   [[f"{r['shape']} {r['tokens']}",
                     *(f"{r[g + '_ms'][k]:.3f} ({r[g + '_tflops'][k]:.0f})"
                       for g in ("gate_up", "down") for k in ("ours", "gm", "gm_contig")),
                     f"{r['gather_ms']:.3f}", f"{r['glu_ms']:.3f}", f"{r['gate_up_err']:.1e} / {r['down_err']:.1e}"]
                    for r in rows])


if __name__ == "__main__":
    main()
