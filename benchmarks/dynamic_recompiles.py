"""Recompiles under ``dynamic=True``: a tiny test model compiled by inductor and by dualsparse, called at several
lengths; prints each backend's graph count and dynamo's recompile reasons (``TORCH_LOGS=recompiles``).

    python benchmarks/dynamic_recompiles.py --arch deepseek_v3 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from models import VOCAB, hf_model  # noqa: E402

SHAPES = ((2, 7), (4, 33), (16, 120))  # (batch, length), within the tiny configs' 128 positions


def graphs_over_shapes(arch: str, backend: str, device: str, dtype: torch.dtype) -> int:
    torch._dynamo.reset()
    counters.clear()
    model = hf_model(arch, "grouped_mm").to(device, dtype)
    options = {"options": {"kernels": "auto", "inner": "inductor"}} if backend == "dualsparse" else {}
    compiled = torch.compile(model, backend=backend, dynamic=True, **options)
    for batch, length in SHAPES:
        with torch.no_grad():
            compiled(torch.randint(3, VOCAB, (batch, length), device=device))
        print(f"{backend} after {batch}x{length}: {counters['stats']['unique_graphs']} graphs", flush=True)
    return counters["stats"]["unique_graphs"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="deepseek_v3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch._logging.set_logs(recompiles=True)
    counts = {b: graphs_over_shapes(args.arch, b, args.device, getattr(torch, args.dtype)) for b in ("inductor", "dualsparse")}
    print("| backend | graphs over " + ", ".join(f"{b}x{n}" for b, n in SHAPES) + " |\n|---|---|")
    for backend, n in counts.items():
        print(f"| {backend} | {n} |")


if __name__ == "__main__":
    main()
