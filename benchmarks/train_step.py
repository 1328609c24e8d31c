"""What a backward through dualsparse costs: one training step (forward with labels + backward) of an
OLMoE-1B-7B-shaped model, random bf16 weights, on the GPU.

    PYTHONUNBUFFERED=1 python benchmarks/train_step.py --json results/train_step.json

Columns: eager, torch.compile with inductor, dualsparse (kernels forward; backward rerunning the reference,
``dsmoe_compiler/gradients.py``). Median ms of ``triton.testing.do_bench`` (gradients accumulate across calls,
which costs the same every call), and each compiled column's worst parameter-gradient relative error against
eager's on one step. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_olmoe import ms, olmoe  # noqa: E402
from moe_layer import print_markdown, save_json  # noqa: E402


def step(model, ids):
    model(ids, labels=ids).loss.backward()


def gradients(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    step(model, ids)
    return {name.removeprefix("_orig_mod."): p.grad.float().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def worst_error(got: dict, want: dict) -> float:
    if set(got) != set(want):
        return float("inf")
    return max(((got[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in want.items())


BACKENDS = (("eager", None, None), ("inductor", "inductor", None), ("dualsparse", "dualsparse", {"kernels": "triton"}))


def profile(model, ids, n: int = 15):
    """Where a step's time goes, per compiled column: its wall time, GPU kernel time and idle (one step after
    three warm ones), the top kernels by GPU time and the top ops by host time (torch.profiler)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for name, backend, options in BACKENDS[1:]:
        torch._dynamo.reset()
        target = torch.compile(model, backend=backend, options=options)
        for _ in range(3):
            step(target, ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(target, ids)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
        with torch.profiler.profile(activities=acts) as prof:
            step(target, ids)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_time_total > 0
                   and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        gpu = sorted(((e.key[:70], e.device_time_total / 1e3, e.count) for e in kernels), key=lambda r: -r[1])
        host = sorted(((e.key[:70], e.self_cpu_time_total / 1e3, e.count) for e in events), key=lambda r: -r[1])
        print(f"\n{name}: one step {wall:.2f} ms wall, GPU kernels {sum(r[1] for r in gpu):.2f} ms")
        for title, unit, rows in (("top kernels", "GPU ms", gpu), ("top host ops (self)", "host ms", host)):
            print_markdown(f"{name}: {title}", ["name", unit, "calls"],
                           [[k, f"{t:.3f}", str(c)] for k, t, c in rows[:n]])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/train_step.json")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="only print where a step's time goes, per backend")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = olmoe(args.layers).train()
    ids = torch.randint(0, 50304, (1, args.tokens), device="cuda")
    if args.profile:
        return profile(model, ids)
    want = gradients(model, ids)
    rows = []
    for name, backend, options in BACKENDS:
        torch._dynamo.reset()
        target = model if backend is None else torch.compile(model, backend=backend, options=options)
        start = time.perf_counter()
        got = gradients(target, ids)
        first = time.perf_counter() - start
        row = {"column": name, "first_call_s": first, "ms": ms(lambda: step(target, ids)),
               "worst_grad_rel_err": None if backend is None else worst_error(got, want)}
        print(row, flush=True)
        rows.append(row)
    save_json(args.json, rows, layers=args.layers, tokens=args.tokens)
    err = lambda r: "–" if r["worst_grad_rel_err"] is None else f"{r['worst_grad_rel_err']:.1e}"  # noqa: E731
    print_markdown(f"\ntraining step, OLMoE-shaped, {args.layers} layers, 1 x {args.tokens} tokens, bf16",
                   ["column", "ms", "vs eager", "first call s", "worst grad rel. err. vs eager"],
                   [[r["column"], f"{r['ms']:.2f}", f"{rows[0]['ms'] / r['ms']:.2f}×", f"{r['first_call_s']:.1f}", err(r)]
                    for r in rows])


if __name__ == "__main__":
    main()
