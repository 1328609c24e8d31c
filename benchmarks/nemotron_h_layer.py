"""NemotronH's MoE block on the GPU (bf16): transformers eager, inductor, dualsparse.

    PYTHONUNBUFFERED=1 python benchmarks/nemotron_h_layer.py --json results/h200/nemotron_h_layer.json

NemotronH's experts have no gate: down(relu(up x)^2). dualsparse captures them as one MoE operator whose gate/up GEMM
issues one product per K step (``GATED`` off) with relu squared in its epilogue; its router (sigmoid scores, a
selection bias, renormalised and scaled) runs in the route kernel, and its shared expert (also gate-less) stays plain
ops. Sizes as we read Nemotron-3-Nano-30B-A3B's config (hidden 2688, 128 experts of 1856 neurons, top-6, a shared
expert of 3712, routed scale 2.5); transformers runs its experts through ``grouped_mm``. Median ms of
triton.testing.do_bench; relative error of inductor and dualsparse against transformers' own bf16 output. Prints a
table last and writes JSON.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_block import one_block_main, randomize_bf16_  # noqa: E402


def nemotron_h_block():
    import transformers as tf
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    config = tf.NemotronHConfig(hidden_size=2688, n_routed_experts=128, num_experts_per_tok=6,
                                moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
                                n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    config._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        block = NemotronHMoE(config).to(torch.bfloat16).eval()
    block = randomize_bf16_(block, lambda name, p: p.shape[-1])  # every weight here stores [.., out, in]
    with torch.no_grad():
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    return block, config.hidden_size


def main():
    one_block_main(nemotron_h_block, "Nemotron-3-Nano-like",
                   "NemotronH MoE block (hidden 2688, 128 gate-less relu2 experts of 1856, top-6, shared 3712), bf16; "
                   "ms, median of do_bench", "results/h200/nemotron_h_layer.json")


if __name__ == "__main__":
    main()
