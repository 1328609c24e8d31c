"""GPT-OSS's MoE block on the GPU (bf16), compiled as a user compiles it: dualsparse against inductor.

    PYTHONUNBUFFERED=1 python benchmarks/gptoss_layer.py --json results/gptoss_layer.json

GPT-OSS stores its experts unlike the other families: gate/up transposed ([E, H, 2I], the output channel
innermost), gate and up interleaved, biases, a clamped SwiGLU, a router with a bias and the softmax after
the top-k. ``GptOssMLP`` of transformers (router + experts, grouped_mm experts implementation) is
built from a config with GPT-OSS-20B's sizes (hidden 2880, intermediate 2880, 32 experts, top-4;
``--experts 128`` for 120B's count), random weights, and compiled twice: ``torch.compile`` (inductor)
and ``backend="dualsparse"`` with ``kernels="triton"``. Both are timed as a plain call, and as one
CUDA graph of the call (the way a server replays decode). Median ms of triton.testing.do_bench.
Output checked against transformers in fp32. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import cuda_graph, median_ms, print_markdown, rel_err, save_json  # noqa: E402

import dsmoe_compiler  # noqa: E402,F401  (registers the backend)


def gptoss_mlp(experts: int, impl: str, dtype=torch.bfloat16, hidden: int = 2880, device: str = "cuda"):
    """transformers' GPT-OSS MoE block with random weights (seeded, so two calls build the same block)."""
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = tf.GptOssConfig(hidden_size=hidden, intermediate_size=hidden, num_local_experts=experts,
                             num_experts_per_tok=4)
    config._experts_implementation = impl
    with torch.device(device):
        mlp = GptOssMLP(config).to(dtype).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, device=device) * (0.01 if "bias" in name else 0.02))
    return mlp


def run(mlp, T, reference_mlp):
    x = torch.randn(1, T, mlp.experts.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = reference_mlp(x.float())[0]
    row = {"tokens": T}
    for name, compiled in (("inductor", torch.compile(mlp)),
                           ("dualsparse", torch.compile(mlp, backend="dualsparse", options={"kernels": "triton"}))):
        call = lambda x, c=compiled: c(x)[0]  # noqa: E731
        with torch.no_grad():
            row[f"{name}_err"] = rel_err(call(x), ref)
            row[f"{name}_ms"] = median_ms(lambda: call(x))
            row[f"{name}_graph_ms"] = median_ms(cuda_graph(lambda: call(x)).replay)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    torch._dynamo.reset()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,256,4096,16384")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--json", default="results/gptoss_layer.json")
    args = ap.parse_args()
    mlp = gptoss_mlp(args.experts, "grouped_mm")
    reference_mlp = gptoss_mlp(args.experts, "eager", dtype=torch.float32)
    reference_mlp.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    rows = [run(mlp, int(T), reference_mlp) for T in args.tokens.split(",")]
    save_json(args.json, rows, experts=args.experts)
    print_markdown(
        f"GPT-OSS MoE block, hidden 2880, intermediate 2880, {args.experts} experts, top-4; ms, median of do_bench",
        ["tokens", "inductor", "dualsparse", "inductor, graph", "dualsparse, graph", "speed-up (graph)",
         "rel. err. inductor / ours"],
        [[str(r["tokens"]), f"{r['inductor_ms']:.3f}", f"{r['dualsparse_ms']:.3f}", f"{r['inductor_graph_ms']:.3f}",
          f"{r['dualsparse_graph_ms']:.3f}", f"{r['inductor_graph_ms'] / r['dualsparse_graph_ms']:.2f}×",
          f"{r['inductor_err']:.1e} / {r['dualsparse_err']:.1e}"] for r in rows])

if __name__ == "__main__":
    main()
