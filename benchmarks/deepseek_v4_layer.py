"""DeepSeek-V4's MoE block on the GPU (bf16): transformers eager, inductor, dualsparse.

    PYTHONUNBUFFERED=1 python benchmarks/deepseek_v4_layer.py --json results/h200/deepseek_v4_layer.json

DeepSeek-V4 routes with a sqrt-softplus top-k (or, in its first layers, a fixed token-id -> experts table) that no
``RoutingSpec`` describes, and clamps its SwiGLU at ``swiglu_limit``. dualsparse takes the routing its graph computes
as given (the routing ops go to inductor) and runs the experts as one MoE operator with the clamp in the gate/up
epilogue; its clamped shared expert folds into the operator (plain ops when the README's table was measured). Transformers runs its experts through
``grouped_mm``. Shape: transformers' default DeepSeek-V4 config (hidden 4096,
expert intermediate 2048, 256 experts, top-6, one shared expert), one "moe" (top-k) layer and one "hash_moe" layer,
random bf16 weights and hash table. Median ms of triton.testing.do_bench; relative error of inductor and dualsparse
against transformers' own bf16 output. Prints a table last and writes JSON.
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

VOCAB = 129280


def deepseek_v4_block(kind: str):
    import transformers as tf
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    config = tf.DeepseekV4Config(num_hidden_layers=1, mlp_layer_types=[kind])
    config._experts_implementation = "grouped_mm"  # a standalone block gets none, and would loop over its experts
    with torch.device("cuda"):
        block = DeepseekV4SparseMoeBlock(config, layer_idx=0).to(torch.bfloat16).eval()
    block = randomize_bf16_(block, lambda name, p: p.shape[-1])  # every weight here stores [.., out, in]
    if kind == "hash_moe":
        experts = config.n_routed_experts
        table = torch.rand(VOCAB, experts, device="cuda").argsort(dim=-1)[:, : config.num_experts_per_tok]
        block.gate.tid2eid.copy_(table)
    return block, config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="moe,hash_moe")
    ap.add_argument("--tokens", default="256,4096")
    ap.add_argument("--json", default="results/h200/deepseek_v4_layer.json")
    args = ap.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        block, config = deepseek_v4_block(kind)
        for T in args.tokens.split(","):
            ids = torch.randint(0, VOCAB, (1, int(T)), device="cuda")
            rows.append(time_block(block, lambda m, x, i=ids: m(x, input_ids=i), kind, int(T), config.hidden_size))
            save_json(args.json, rows)  # a run that ends early keeps its rows
        del block
        gc.collect()
        torch.cuda.empty_cache()
    print_markdown(
        "DeepSeek-V4 MoE block (hidden 4096, expert intermediate 2048, 256 experts, top-6, shared 1, swiglu_limit 10), "
        "bf16; ms, median of do_bench", HEADER, table_lines(rows, lambda r: f"{r['shape']} layer"))


if __name__ == "__main__":
    main()
