"""DBRX's MoE block on the GPU (bf16): transformers eager, inductor, dualsparse.

    PYTHONUNBUFFERED=1 python benchmarks/dbrx_layer.py --json results/h200/dbrx_layer.json

DBRX keeps its experts as three 2-D [E I, H] tensors, the down projection stored [in, out]; transformers loops over
the experts a batch routes to (the block has no other implementation). dualsparse captures the block as one MoE
operator over views of those tensors (``transformers_hf.dbrx_moe_forward``; the down GEMM reads the transposed view
through the transposed layout's descriptor, no copy). Sizes of DBRX's config (hidden 6144, 16 experts of 10752, top-4,
weights renormalised by their 1-norm). Median ms of triton.testing.do_bench; relative error of inductor and dualsparse
against transformers' own bf16 output. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_block import HEADER, randomize_bf16_, table_lines, time_block  # noqa: E402
from moe_layer import print_markdown, save_json  # noqa: E402


def dbrx_block(hidden=6144, inter=10752, experts=16, top_k=4):
    import transformers as tf
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    config = tf.DbrxConfig(d_model=hidden, n_heads=48, ffn_config={"ffn_hidden_size": inter, "moe_num_experts": experts,
                                                                     "moe_top_k": top_k})
    with torch.device("cuda"):
        block = DbrxFFN(config).to(torch.bfloat16).eval()
    # w1, v1 store [E I, H] as [out, in] (fan-in H); w2 stores [E I, H] as [in, out] (fan-in I); the router's fan-in is H
    return randomize_bf16_(block, lambda name, p: inter if name.endswith("w2") else p.shape[-1]), config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="256,4096")
    ap.add_argument("--json", default="results/h200/dbrx_layer.json")
    ap.add_argument("--mode", default=None, help='torch.compile mode for both, e.g. "reduce-overhead"')
    args = ap.parse_args()
    block, config = dbrx_block()
    rows = []
    for T in args.tokens.split(","):
        rows.append(time_block(block, lambda m, x: m(x), "DBRX", int(T), config.d_model, args.mode))
        save_json(args.json, rows)  # a run that ends early keeps its rows
    print_markdown("DBRX MoE block (hidden 6144, 16 experts of 10752, top-4), bf16; ms, median of do_bench", HEADER,
                   table_lines(rows, lambda r: r["shape"]))


if __name__ == "__main__":
    main()
