"""End to end on the GPU: an OLMoE-1B-7B-shaped transformers model (random bf16 weights).

    PYTHONUNBUFFERED=1 python benchmarks/e2e_olmoe.py --json results/e2e_olmoe.json

Cases (as in shared/reference/gpu-notes.md): prefill of 1 x 4096 tokens and one step of 64 sequences
x 1 token, use_cache=False. Columns: eager, torch.compile with inductor, dualsparse (Triton MoE
kernels, inductor for the rest), and dualsparse with 2T-Drop fitted to 25 % compute drop (plan
calibrated on a random batch; measured rate printed). Also a dense model (the same without MoE:
OLMoE with 1 expert, top-1, as a plain MLP is not available, so a Llama of the same width) to show
the rest of the graph compiles as with inductor. Median ms of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from triton.testing import do_bench

import dsmoe_compiler


def olmoe(layers: int):
    import transformers as tf

    config = tf.OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                            max_position_embeddings=4096)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def llama(layers: int):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return model


def ms(fn) -> float:
    return float(do_bench(fn, warmup=5, rep=30, return_mode="median"))


def bench(model, inputs, backend, options=None):
    torch._dynamo.reset()
    fn = model if backend is None else torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        start = time.perf_counter()
        fn(**inputs)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        return ms(lambda: fn(**inputs)), first


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/e2e_olmoe.json")
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    model = olmoe(args.layers)
    cases = {"prefill 1x4096": {"input_ids": torch.randint(0, 50304, (1, 4096), device="cuda"), "use_cache": False},
             "step 64x1": {"input_ids": torch.randint(0, 50304, (64, 1), device="cuda"), "use_cache": False}}
    plan = dsmoe_compiler.calibrate(model, [torch.randint(0, 50304, (1, 4096), device="cuda")], progress=False)
    columns = {"eager": (None, None), "inductor": ("inductor", None),
               "dualsparse": ("dualsparse", {"kernels": "triton"}),
               "dualsparse 2T 25%": ("dualsparse", {"kernels": "triton", "plan": plan, "drop": "2t", "drop_rate": 0.25,
                                                     "stats": True})}
    for case, inputs in cases.items():
        row = {"model": "OLMoE-shaped", "case": case}
        for column, (backend, options) in columns.items():
            dsmoe_compiler.reset_drop_stats()
            row[column], row[column + " first call s"] = bench(model, inputs, backend, options)
            if options and options.get("drop"):
                row[column + " measured drop"] = dsmoe_compiler.drop_stats()["overall"]["drop_rate"]
            print(case, column, f"{row[column]:.2f} ms", flush=True)
        rows.append(row)
    del model, plan
    torch.cuda.empty_cache()
    dense = llama(args.layers)
    inputs = {"input_ids": torch.randint(0, 50304, (1, 4096), device="cuda"), "use_cache": False}
    row = {"model": "dense (Llama-shaped)", "case": "prefill 1x4096"}
    for column in ("inductor", "dualsparse"):
        row[column], row[column + " first call s"] = bench(dense, inputs, column, None)
    rows.append(row)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    cols = ["eager", "inductor", "dualsparse", "dualsparse 2T 25%"]
    print("| model | case | " + " | ".join(cols) + " | dualsparse vs inductor | 2T 25% vs inductor | measured drop |")
    print("|---" * (len(cols) + 5) + "|")
    for r in rows:
        vals = " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cols)
        ratio = f"{r['inductor'] / r['dualsparse']:.2f}x"
        drop_ratio = f"{r['inductor'] / r['dualsparse 2T 25%']:.2f}x" if "dualsparse 2T 25%" in r else "-"
        drop = f"{r['dualsparse 2T 25% measured drop']:.3f}" if "dualsparse 2T 25% measured drop" in r else "-"
        print(f"| {r['model']} | {r['case']} | {vals} | {ratio} | {drop_ratio} | {drop} |")


if __name__ == "__main__":
    main()
