"""One transformers MoE block on the CPU (fp32): what compiling with dualsparse costs or gains where there is no GPU.

    python benchmarks/cpu_layer.py --json results/cpu_layer.json

On the CPU the operator runs its reference (``codegen/reference.py``), its experts either a loop over the sub-experts
that have pairs or, with few rows per sub-expert, grouped products (``codegen/cpu_grouped.py``).
Columns (ms a call, the median over rounds of the median of about a second of calls; the columns take turns, so a
slow stretch of the machine hits them all): transformers' ``OlmoeSparseMoeBlock`` with experts implementation
"eager" and "grouped_mm", "grouped_mm" under inductor, and dualsparse with the eager and the inductor inner compiler
(``kernels="auto"``: the experts as grouped products where ``codegen/cpu_grouped.py`` applies them), and with
``kernels="reference"`` (the reference's loop over sub-experts) and the eager inner compiler.
Each compiled output is checked against transformers' own (fp32, relative error < 1e-5) and dualsparse must
rewrite the block. Shapes are OLMoE's and Mixtral's with hidden and intermediate sizes cut to fit a small machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import print_markdown, rel_err, save_json  # noqa: E402

import dsmoe_compiler  # noqa: E402

SHAPES = {  # name: (hidden, intermediate, experts, top-k)
    "OLMoE/2": (1024, 512, 64, 8),
    "Mixtral/4": (1024, 3584, 8, 2),
}


def block(H, I, E, K, impl, state=None):
    import transformers as tf

    config = tf.OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                            num_hidden_layers=1, num_attention_heads=8, vocab_size=128)
    config._experts_implementation = impl
    torch.manual_seed(0)
    mlp = tf.AutoModelForCausalLM.from_config(config).eval().model.layers[0].mlp
    if state is not None:
        mlp.load_state_dict(state)
    return mlp


def median_ms(fn, seconds: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def columns(H, I, E, K, x) -> dict:
    """Every column's callable for one input, each compiled one checked against transformers' own output on it."""
    reference = block(H, I, E, K, "grouped_mm")
    state = reference.state_dict()
    made = {"hf eager": block(H, I, E, K, "eager", state), "hf grouped_mm": reference}
    want = reference(x)
    for label, backend, options in (("grouped_mm + inductor", "inductor", None),
                                    ("dualsparse (eager inner)", "dualsparse", {"inner": "eager"}),
                                    ("dualsparse loop (eager inner)", "dualsparse", {"inner": "eager", "kernels": "reference"}),
                                    ("dualsparse (inductor inner)", "dualsparse", {"inner": "inductor"})):
        torch._dynamo.reset()
        fn = torch.compile(block(H, I, E, K, "grouped_mm", state), backend=backend, options=options)
        assert rel_err(fn(x), want) < 1e-5, (label, rel_err(fn(x), want))
        if backend == "dualsparse":
            assert len(dsmoe_compiler.last_report().rewritten) == 1, str(dsmoe_compiler.last_report())
        made[label] = fn
    return made


def run_shape(name, tokens, rounds, seconds):
    H, I, E, K = SHAPES[name]
    rows = []
    for T in tokens:
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            made = columns(H, I, E, K, x)
            samples = {label: [] for label in made}
            for _ in range(rounds):
                for label, fn in made.items():
                    samples[label].append(median_ms(lambda: fn(x), seconds))
        row = {"shape": name, "tokens": T, **{label: statistics.median(v) for label, v in samples.items()}}
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="results/cpu_layer.json")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", default="16,256,1024")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = [r for name in args.shapes.split(",") for r in run_shape(name, tokens, args.rounds, args.seconds)]
    save_json(args.json, rows, threads=torch.get_num_threads())
    labels = [k for k in rows[0] if k not in ("shape", "tokens")]
    best_peer = lambda r: min(r[k] for k in labels if not k.startswith("dualsparse"))  # noqa: E731
    print_markdown(f"CPU, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, ms a call",
                   ["shape", "tokens", *labels, "best peer / dualsparse (eager inner)"],
                   [[r["shape"], str(r["tokens"]), *(f"{r[k]:.2f}" for k in labels),
                     f"{best_peer(r) / r['dualsparse (eager inner)']:.2f}x"] for r in rows])


if __name__ == "__main__":
    main()
