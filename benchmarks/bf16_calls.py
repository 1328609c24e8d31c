"""Per-call bf16 errors of a compiled tiny transformers model on the GPU, against eager in bf16 and in fp32.

    python benchmarks/bf16_calls.py --arch jetmoe

``tests/models.triton_bf16_errors`` checks each call of a compiled model (kernels "triton") against eager bf16. When
a call misses, this tells whose error it is: each batch runs twice (the first call of a batch may be the first of the
compiled model: tracing, autotuning; later calls capture and replay the operator's CUDA graph), through the kernels
and through the reference operator, and every output is compared with eager in bf16 and with an fp32 copy of the
model. Prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from models import VOCAB, hf_model  # noqa: E402

from dsmoe_compiler.codegen import dispatch  # noqa: E402


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="jetmoe")
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args()
    model = hf_model(args.arch, None).to("cuda", torch.bfloat16)
    fp32 = copy.deepcopy(model).float()
    generator = torch.Generator("cuda").manual_seed(9)
    batches = [torch.randint(3, VOCAB, (4, 33), device="cuda", generator=generator) for _ in range(args.batches)]
    compiled = {}
    for kernels in ("triton", "reference"):
        dispatch._PLANS.clear()
        torch._dynamo.reset()
        compiled[kernels] = torch.compile(copy.deepcopy(model), backend="dualsparse",
                                          options={"kernels": kernels, "inner": "eager"})
        rows = []
        with torch.no_grad():
            for b, ids in enumerate(batches):
                for repeat in range(2):
                    want16, want32 = model(ids).logits, fp32(ids).logits
                    got = compiled[kernels](ids).logits
                    rows.append((b, repeat, rel(got, want16), rel(got, want32), rel(want16, want32),
                                 bool(torch.isfinite(got).all())))
        print(f"\n{args.arch}, kernels {kernels}: relative error of the logits")
        print("| batch | call of it | vs eager bf16 | vs eager fp32 | eager bf16 vs fp32 | finite |")
        print("|---|---|---|---|---|---|")
        for b, repeat, e16, e32, base, finite in rows:
            print(f"| {b} | {repeat + 1} | {e16:.2e} | {e32:.2e} | {base:.2e} | {finite} |")


if __name__ == "__main__":
    main()
