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

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_block import one_block_main, randomize_bf16_  # noqa: E402


def dbrx_block(hidden=6144, inter=10752, experts=16, top_k=4):
    import transformers as tf
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    config = tf.DbrxConfig(d_model=hidden, n_heads=48, ffn_config={"ffn_hidden_size": inter, "moe_num_experts": experts,
                                                                     "moe_top_k": top_k})
    with torch.device("cuda"):
        block = DbrxFFN(config).to(torch.bfloat16).eval()
    # w1, v1 store [E I, H] as [out, in] (fan-in H); w2 stores [E I, H] as [in, out] (fan-in I); the router's fan-in is H
    return randomize_bf16_(block, lambda name, p: inter if name.endswith("w2") else p.shape[-1]), config.d_model


def main():
    one_block_main(dbrx_block, "DBRX",
                   "DBRX MoE block (hidden 6144, 16 experts of 10752, top-4), bf16; ms, median of do_bench",
                   "results/h200/dbrx_layer.json")


if __name__ == "__main__":
    main()
