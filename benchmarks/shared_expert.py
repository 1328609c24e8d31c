"""Shared experts (DeepSeek, Qwen2-MoE) on the GPU, bf16: the torch path the operator runs now against our
grouped-GEMM kernels given the same MLP as a one-expert group.

    PYTHONUNBUFFERED=1 python benchmarks/shared_expert.py --json results/shared_expert.json

Per (shape, tokens): the shared MLP y = down(silu(x gate^T) * (x up^T)) as ``reference.shared_experts`` computes
it (cuBLAS GEMMs and torch elementwise), and as ``dispatch.moe_triton`` of a one-expert MoE whose expert is that
MLP, weights in the "separate" layout with no copy (every token routed to expert 0 with weight 1). For ours only
the two grouped GEMMs count (gate_up_glu + down_weighted, from the kernel breakdown of a graph replay): what a
shared-expert launch of the same kernels would cost without routing. Both outputs are checked against the fp32
reference. Milliseconds are GPU time per call (profiled replays, per kernel the median of 5 profiles after a
discarded one, ``layer_ab.profiled_rounds``); DSMOE_PERSISTENT
decides the launch shape as in the kernels. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer_ab import profiled_rounds  # noqa: E402
from moe_layer import cuda_graph, make_spec, parse_cases, rel_err, save_json  # noqa: E402

from dsmoe_compiler.codegen import dispatch, reference  # noqa: E402

SHAPES = {  # name: (hidden, shared intermediate)
    "DeepSeek-V2-Lite": (2048, 2 * 1408),
    "Qwen1.5-MoE-A2.7B": (2048, 5632),
    "DeepSeek-V3": (7168, 2048),
}


def run_case(name, T):
    H, S = SHAPES[name]
    with_shared = make_spec(H, S, 1, 1, False, shared=S)
    gate, up, down = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) * fan ** -0.5
                      for shape, fan in (((S, H), H), ((S, H), H), ((H, S), S)))
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    shared_params = [None, None, None, gate, up, down]  # slots: router_weight, gate_up, down, shared_*
    ref = reference.shared_experts(x.float(), [p.float() if p is not None else None for p in shared_params],
                                   with_shared)
    torch_fn = lambda: reference.shared_experts(x, shared_params, with_shared)  # noqa: E731
    one_expert = make_spec(H, S, 1, 1, False)
    from dataclasses import replace
    one_expert = replace(one_expert, experts=replace(one_expert.experts, layout="separate"),
                         slots=("router_weight", "gate", "up", "down"))
    ours_params = [torch.zeros(1, H, device="cuda", dtype=torch.bfloat16), gate[None], up[None], down[None]]
    ours_fn = lambda: dispatch.moe_triton(x, ours_params, one_expert)  # noqa: E731
    row = {"shape": name, "tokens": T, "hidden": H, "shared": S,
           "torch_err": rel_err(torch_fn(), ref), "ours_err": rel_err(ours_fn(), ref)}
    torch_k, ours_k = (profiled_rounds({"one": cuda_graph(fn)}, rounds=5)["one"] for fn in (torch_fn, ours_fn))
    row["torch_ms"] = sum(torch_k.values())
    row["ours_gemms_ms"] = sum(v for k, v in ours_k.items() if k.startswith(("gate_up_glu", "down_weighted")))
    row["ours_all_ms"] = sum(ours_k.values())
    row["torch_kernels"], row["ours_kernels"] = torch_k, ours_k
    flops = 2 * T * H * 3 * S
    row["torch_tflops"], row["ours_tflops"] = flops / row["torch_ms"] / 1e9, flops / row["ours_gemms_ms"] / 1e9
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("kernels")}), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="DeepSeek-V2-Lite:4096,DeepSeek-V2-Lite:16384,Qwen1.5-MoE-A2.7B:4096,"
                                       "DeepSeek-V3:4096")
    ap.add_argument("--json", default="results/shared_expert.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [run_case(name, T) for name, T in parse_cases(args.cases)]
    save_json(args.json, rows, persistent=os.environ.get("DSMOE_PERSISTENT", "auto"))
    print(f"DSMOE_PERSISTENT={os.environ.get('DSMOE_PERSISTENT', 'auto')}; GPU ms per call (profiled)")
    print("| shape | tokens | torch (cuBLAS) | TFLOP/s | our two GEMMs | TFLOP/s | ours incl. routing | rel. err. torch / ours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['torch_ms']:.3f} | {r['torch_tflops']:.0f} | {r['ours_gemms_ms']:.3f} "
              f"| {r['ours_tflops']:.0f} | {r['ours_all_ms']:.3f} | {r['torch_err']:.1e} / {r['ours_err']:.1e} |")


if __name__ == "__main__":
    main()
