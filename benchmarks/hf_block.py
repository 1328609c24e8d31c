"""One transformers MoE block on the GPU in bf16, timed three ways: transformers eager, inductor, dualsparse.

Shared by the per-model block benchmarks (``llama4_layer.py``, ``deepseek_v4_layer.py``): random bf16 weights
drawn per expert (no fp32 copy of a whole 3-D tensor), then for each token count the median ms of do_bench and the
relative error of inductor and dualsparse against transformers' own bf16 output.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import median_ms, print_markdown, rel_err, save_json  # noqa: E402

import dsmoe_compiler  # noqa: E402,F401  (registers the backend)


def randomize_bf16_(block: torch.nn.Module, fan_in_of) -> torch.nn.Module:
    """N(0, fan_in^-1/2) for every parameter, per expert for 3-D ones; ``fan_in_of(name, p)`` says the fan-in."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            for part in p.view(-1, *p.shape[-2:]) if p.dim() == 3 else [p]:
                part.normal_(0, fan_in_of(name, p) ** -0.5, generator=generator)
    return block


def time_block(block, call, shape: str, T: int, hidden: int, mode: str | None = None) -> dict:
    """``call(module, x)`` runs the block on x [1, T, hidden] and returns its output tensor; ``mode``: torch.compile's
    (e.g. "reduce-overhead": CUDA graphs of the whole compiled block, for both inductor and dualsparse)."""
    x = torch.randn(1, T, hidden, device="cuda", dtype=torch.bfloat16)
    row = {"shape": shape, "tokens": T}
    with torch.no_grad():
        ref = call(block, x)
        row["eager_ms"] = median_ms(lambda: call(block, x))
        # torch.compile takes a mode or options, not both: ours takes the mode as one of its options
        ours = torch.compile(block, backend="dualsparse", options={"kernels": "triton", **({"mode": mode} if mode else {})})
        for name, compiled in (("inductor", torch.compile(block, mode=mode)), ("dualsparse", ours)):
            row[f"{name}_err"] = rel_err(call(compiled, x), ref)
            row[f"{name}_ms"] = median_ms(lambda c=compiled: call(c, x))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    row["captured"] = [b.variant for b in dsmoe_compiler.last_report().rewritten]
    torch._dynamo.reset()
    return row


def table_lines(rows: list[dict], label) -> list[list[str]]:
    """The closing table's rows: ``label(row)``, tokens, the three times, the speed-up over inductor, the errors."""
    return [[label(r), str(r["tokens"]), f"{r['eager_ms']:.3f}", f"{r['inductor_ms']:.3f}", f"{r['dualsparse_ms']:.3f}",
             f"{r['inductor_ms'] / r['dualsparse_ms']:.2f}×", f"{r['inductor_err']:.1e} / {r['dualsparse_err']:.1e}"]
            for r in rows]


HEADER = ["shape", "tokens", "transformers eager", "inductor", "dualsparse", "vs inductor", "rel. err. inductor / ours"]


def one_block_main(build, shape: str, title: str, json_default: str) -> None:
    """The command line of a one-block benchmark (``dbrx_layer.py``, ``nemotron_h_layer.py``): ``--tokens``,
    ``--json``, ``--mode``; ``build()`` -> (block, its hidden size), the block called on x alone; each token count timed by
    ``time_block`` and saved as it comes (a run that ends early keeps its rows), the table printed last."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="256,4096")
    ap.add_argument("--json", default=json_default)
    ap.add_argument("--mode", default=None, help='torch.compile mode for both, e.g. "reduce-overhead"')
    args = ap.parse_args()
    block, hidden = build()
    rows = []
    for T in args.tokens.split(","):
        rows.append(time_block(block, lambda m, x: m(x), shape, int(T), hidden, args.mode))
        save_json(args.json, rows)
    print_markdown(title, HEADER, table_lines(rows, lambda r: r["shape"]))
