"""Llama-4's MoE block on the GPU (bf16): transformers eager, inductor, dualsparse.

    PYTHONUNBUFFERED=1 python benchmarks/llama4_layer.py --json results/h200/llama4_layer.json

Llama-4 routes each token to its top-1 expert by logit, weights it by the sigmoid of that logit and applies
the weight to the expert's *input*; its block (``Llama4TextMoe``) then runs every expert on every token
(``bmm`` over [E, T, H], non-selected tokens scaled to 0) and adds a shared expert. dualsparse captures the
block as one MoE operator (``weight_on_input``: the gate/up epilogue scales both products by the weight
before the SwiGLU), so only the selected (token, expert) pairs cost FLOPs. Shapes: Scout (hidden 5120,
expert intermediate 8192, 16 experts, shared 8192) and Maverick (128 experts), random bf16 weights.
Median ms of triton.testing.do_bench; relative error of inductor and dualsparse against transformers' own
bf16 output. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_block import HEADER, randomize_bf16_, table_lines, time_block  # noqa: E402
from moe_layer import print_markdown, save_json  # noqa: E402

SHAPES = {"Scout": 16, "Maverick": 128}  # experts; hidden 5120, intermediate 8192, top-1, shared 8192 in both


def llama4_block(experts: int, hidden: int = 5120, inter: int = 8192):
    import transformers as tf
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = tf.Llama4TextConfig(hidden_size=hidden, intermediate_size=inter, intermediate_size_mlp=2 * inter,
                                 num_local_experts=experts, num_experts_per_tok=1)
    with torch.device("cuda"):
        block = Llama4TextMoe(config).to(torch.bfloat16).eval()
    # experts store [E, in, out]
    return randomize_bf16_(block, lambda name, p: p.shape[-2] if name.startswith("experts.") else p.shape[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="Scout,Maverick")
    ap.add_argument("--tokens", default="256,4096")
    ap.add_argument("--json", default="results/h200/llama4_layer.json")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        block = llama4_block(SHAPES[shape])
        for T in args.tokens.split(","):
            rows.append(time_block(block, lambda m, x: m(x)[0], shape, int(T), block.hidden_dim))
            save_json(args.json, rows)  # a run that ends early keeps its rows
        del block
        gc.collect()
        torch.cuda.empty_cache()
    print_markdown(
        "Llama-4 MoE block (hidden 5120, intermediate 8192, top-1, shared 8192), bf16; ms, median of do_bench",
        HEADER, table_lines(rows, lambda r: f"{r['shape']} ({SHAPES[r['shape']]} experts)"))


if __name__ == "__main__":
    main()
