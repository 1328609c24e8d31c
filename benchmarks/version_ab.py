"""A/B of two installed versions of dualsparse on one MoE layer (GPU, bf16): is a slower table a slower machine, or
slower code?

    git archive 7873cdf | tar -x -C old_src          # an older commit's tree
    python -m pip install -q --no-deps --no-build-isolation --target /tmp/old ./old_src  # a path, not a name
    PYTHONUNBUFFERED=1 python benchmarks/version_ab.py --versions old=/tmp/old,head= \
        --cases OLMoE:4096,Qwen3-30B-A3B:4096 --rounds 3 --json results/version_ab.json

A version is NAME=PATH: PATH goes first on the child's PYTHONPATH (empty: the installed package). Each round runs one
child process per version, the order alternating between rounds so that clock drift (the H200's power cap) falls on
both alike. A child times ``dispatch.moe_triton`` on the same seeded inputs as ``moe_layer.py`` (CUDA-graph replay,
median of do_bench) after checking it against ``reference.moe``. Prints a table (median over rounds) last and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(cases: str) -> None:
    """Time each case with the dualsparse that this process imports; print one JSON line of {case: ms}."""
    import torch

    from moe_layer import SHAPES, cuda_graph, make_params, make_spec, median_ms, parse_cases, rel_err

    import dsmoe_compiler
    from dsmoe_compiler.codegen import dispatch, reference

    out = {"module": os.path.dirname(dsmoe_compiler.__file__)}
    for name, T in parse_cases(cases):
        torch.manual_seed(0)
        H, I, E, K, renorm, _ = SHAPES[name]
        spec = make_spec(H, I, E, K, renorm)
        params = make_params(spec)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        fn = lambda: dispatch.moe_triton(x, params, spec)  # noqa: E731
        err = rel_err(fn(), reference.moe(x, params, spec))
        if not err < 1e-2:
            raise SystemExit(f"{name}:{T}: relative error {err:.2e} against the reference")
        out[f"{name}:{T}"] = median_ms(cuda_graph(fn).replay)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(path: str, cases: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--cases", cases], env=env,
                          capture_output=True, text=True, cwd=HERE)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child for {path or 'installed'} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", help="NAME=PATH,NAME=PATH (empty PATH: the installed package)")
    ap.add_argument("--cases", default="OLMoE:4096,Qwen3-30B-A3B:4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.cases)
    if not args.versions:
        ap.error("--versions is required")
    versions = [item.split("=", 1) for item in args.versions.split(",")]
    runs = {name: [] for name, _ in versions}
    for r in range(args.rounds):
        for name, path in (versions if r % 2 == 0 else versions[::-1]):
            result = run_child(path, args.cases)
            runs[name].append(result)
            print(f"round {r} {name} ({result.pop('module')}): {result}", flush=True)
    cases = args.cases.split(",")
    medians = {name: {c: statistics.median(run[c] for run in runs[name]) for c in cases} for name in runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": dict(versions), "rounds": runs, "medians": medians}, f, indent=1)
    names = list(runs)
    print("| case | " + " | ".join(f"{n} ms" for n in names) + f" | {names[-1]} / {names[0]} |")
    print("|---" * (len(names) + 2) + "|")
    for c in cases:
        print(f"| {c} | " + " | ".join(f"{medians[n][c]:.3f}" for n in names)
              + f" | {medians[names[-1]][c] / medians[names[0]][c]:.3f} |")


if __name__ == "__main__":
    main()
