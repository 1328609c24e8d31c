"""LongCat-Flash's MoE block on the GPU (bf16): transformers' eager loop, dualsparse, and dualsparse computing the
zero-computation experts' pairs as expert 0 at weight 0 (absent pairs off).

    PYTHONUNBUFFERED=1 python benchmarks/longcat_layer.py --json results/h200/longcat_layer.json

LongCat-Flash routes each token to 12 of 512 routed and 256 zero-computation experts; a pair on a zero-computation
expert adds weight * x. dualsparse runs the routed experts as one operator on the routing the graph computes and
leaves the other pairs out of the grouping (``RoutingSpec.absent_ids``, ``reference.present_pairs``). The third
column turns that off (exact as well: those pairs then run expert 0 at weight 0), to measure what leaving them out
saves. The floor is moe_layer.py's: max(the routed pairs' FLOPs / measured GEMM peak, the touched routed
experts' weight bytes / measured copy bandwidth). Shape: transformers' default LongCat-Flash config (hidden 6144,
expert intermediate 2048), random bf16 weights (~52 GB of experts). Median ms of triton.testing.do_bench; relative error against transformers' own bf16
output. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_block import randomize_bf16_  # noqa: E402
from moe_layer import ceilings, median_ms, print_markdown, rel_err, save_json  # noqa: E402

from dsmoe_compiler.capture import transformers_hf  # noqa: E402
from dsmoe_compiler.codegen.reference import parse_spec  # noqa: E402


def longcat_block():
    import transformers as tf
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    config = tf.LongcatFlashConfig(num_hidden_layers=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: its fp32 weights alone would be ~100 GB
    try:
        with torch.device("cuda"):
            block = LongcatFlashMoE(config).eval()
    finally:
        torch.set_default_dtype(default)
    return randomize_bf16_(block, lambda name, p: p.shape[-1]), config  # every weight here stores [.., out, in]


def _plan_without_absent_pairs(original):
    @torch._dynamo.assume_constant_result
    def plan(*args):
        spec = original(*args)
        if not spec.startswith("{"):
            return spec
        s = parse_spec(spec)
        return s.replace(routing=dataclasses.replace(s.routing, absent_ids=False)).to_json()

    return plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--json", default="results/h200/longcat_layer.json")
    args = ap.parse_args()
    block, config = longcat_block()
    peak, bw = ceilings()
    print(f"measured: bf16 GEMM {peak / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s", flush=True)
    H, I, routed = config.hidden_size, config.expert_ffn_hidden_size, config.n_routed_experts
    rows = []
    original_plan = transformers_hf.longcat_plan
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, T, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        row = {"tokens": T}
        with torch.no_grad():
            index = block.router(x)[-1]  # (logits,) weights, ids
            row["zero_expert_share"] = (index >= routed).float().mean().item()
            # the floor, as moe_layer.py's: the routed pairs' products at the GEMM peak, or the touched routed experts'
            # weights (three [I, H] matrices each) at the copy rate, whichever takes longer
            routed_pairs = int((index < routed).sum())
            touched = int(torch.unique(index[index < routed]).numel())
            row["floor_ms"] = max(6 * routed_pairs * H * I / peak, touched * 3 * H * I * 2 / bw) * 1e3
            row["touched_experts"] = touched
            ref = block(x)
            row["eager_ms"] = median_ms(lambda: block(x))
            for name, plan in (("dualsparse", original_plan), ("absent_off", _plan_without_absent_pairs(original_plan))):
                transformers_hf.longcat_plan = plan
                torch._dynamo.reset()
                compiled = torch.compile(block, backend="dualsparse", options={"kernels": "triton", "inner": "eager"})
                row[f"{name}_err"] = rel_err(compiled(x), ref)
                row[f"{name}_ms"] = median_ms(lambda c=compiled: c(x))
            transformers_hf.longcat_plan = original_plan
        print(json.dumps(row), flush=True)
        rows.append(row)
        save_json(args.json, rows)
    print_markdown("LongCat-Flash MoE block (hidden 6144, 512 routed experts of 2048 + 256 zero-computation, top-12), "
                   "bf16; ms, median of do_bench",
                   ["tokens", "zero-expert pairs", "floor", "transformers eager", "dualsparse", "dualsparse / floor",
                    "absent pairs off", "saved by leaving them out", "rel. err. ours / off"],
                   [[str(r["tokens"]), f"{r['zero_expert_share']:.2f}", f"{r['floor_ms']:.3f}", f"{r['eager_ms']:.3f}",
                     f"{r['dualsparse_ms']:.3f}", f"{r['dualsparse_ms'] / r['floor_ms']:.2f}", f"{r['absent_off_ms']:.3f}",
                     f"{r['absent_off_ms'] / r['dualsparse_ms']:.2f}×",
                     f"{r['dualsparse_err']:.1e} / {r['absent_off_err']:.1e}"] for r in rows])


if __name__ == "__main__":
    main()
