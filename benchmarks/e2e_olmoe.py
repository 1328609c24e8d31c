"""End to end on the GPU: an OLMoE-1B-7B-shaped transformers model (random bf16 weights).

    PYTHONUNBUFFERED=1 python benchmarks/e2e_olmoe.py --json results/e2e_olmoe.json

Cases (as in shared/reference/gpu-notes.md): prefill of 1 x 4096 tokens and one step of 64 sequences
x 1 token, use_cache=False. Columns: eager, torch.compile with inductor, dualsparse (Triton MoE
kernels, inductor for the rest), and dualsparse with 2T-Drop fitted to 25 % compute drop (plan
calibrated on a random batch; measured rate printed). Also a dense model (the same without MoE:
OLMoE with 1 expert, top-1, as a plain MLP is not available, so a Llama of the same width) to show
the rest of the graph compiles as with inductor. Median ms of triton.testing.do_bench.
Columns marked "RO" compile with mode="reduce-overhead" (CUDA graphs for the whole step, both backends).
``--cases`` runs a subset (the whole run takes longer than one device call); ``--merge a.json b.json``
combines the rows of partial runs into --json and prints the table. ``--dynamic`` compiles every column with
``dynamic=True`` (the graph that serving with varying lengths runs: dynamo's automatic dynamic shapes recompile to
it at the second length), ``--columns`` keeps the named columns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from triton.testing import do_bench

import dsmoe_compiler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_sweep import timeline  # noqa: E402
from moe_layer import host_ms  # noqa: E402


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
    """Median over about a second of calls (do_bench's warmup and rep are milliseconds: the earlier 5 / 30 ms
    timed a 30 ms prefill once)."""
    return float(do_bench(fn, warmup=200, rep=1000, return_mode="median"))


def bench(model, inputs, backend, options=None, mode=None, dynamic=None):
    torch._dynamo.reset()
    if backend == "dualsparse" and mode is not None:  # torch.compile takes mode or options, not both
        options, mode = {**(options or {}), "mode": mode}, None
    fn = model if backend is None else torch.compile(model, backend=backend, options=options, mode=mode,
                                                      dynamic=dynamic)
    with torch.no_grad():
        start = time.perf_counter()
        fn(**inputs)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        return ms(lambda: fn(**inputs)), first


def top_kernels(model, inputs, backend, options=None, n=12) -> list[tuple[str, float]]:
    """GPU ms per kernel name in one compiled call (torch.profiler): where the end-to-end time goes."""
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        for _ in range(3):
            fn(**inputs)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(**inputs)
            torch.cuda.synchronize()
        print_idle(timeline(lambda: fn(**inputs)))
    times = [(ev.key[:60], getattr(ev, "device_time_total", 0) / 1e3)
             for ev in prof.key_averages()]
    times = sorted((kv for kv in times if kv[1] > 0), key=lambda kv: -kv[1])
    return [("TOTAL", sum(t for _, t in times))] + times[:n]


def print_idle(tl: dict):
    """Where the GPU waits inside one compiled call: span, kernel time, idle, and the longest gaps."""
    print(f"  one call on the GPU: span {tl['span_us'] / 1e3:.3f} ms, kernels {tl['busy_us'] / 1e3:.3f} ms, "
          f"idle {tl['idle_us'] / 1e3:.3f} ms; longest gaps (µs): "
          + "; ".join(f"{g['us']:.1f} {g['after'][:28]} -> {g['before'][:28]}" for g in tl["largest_gaps"]))


def calibration_plan(model):
    """Neuron importance and score samples from one random 4096-token batch (what the 2T column fits to)."""
    return dsmoe_compiler.calibrate(model, [torch.randint(0, 50304, (1, 4096), device="cuda")], progress=False)


def two_t_options(plan) -> dict:
    """The 2T column: thresholds fitted to a 25 % compute drop rate on the plan's calibration scores."""
    return {"kernels": "triton", "plan": plan, "drop": "2t", "drop_rate": 0.25, "stats": True}


def host_profile(layers: int, calls: int = 20):
    """cProfile of `calls` compiled 64 x 1 steps (no CUDA graphs): dualsparse without and with 2T-Drop."""
    import cProfile
    import pstats

    torch.manual_seed(0)
    model = olmoe(layers)
    inputs = {"input_ids": torch.randint(0, 50304, (64, 1), device="cuda"), "use_cache": False}
    plan = calibration_plan(model)
    for name, options in (("dualsparse", {"kernels": "triton"}), ("dualsparse 2T 25%", two_t_options(plan))):
        torch._dynamo.reset()
        fn = torch.compile(model, backend="dualsparse", options=options)
        with torch.no_grad():
            for _ in range(5):
                fn(**inputs)
            host = host_ms(lambda: fn(**inputs), calls)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn(**inputs)
            torch.cuda.synchronize()
            prof.disable()
        print(f"\n{name}: host {host:.2f} ms per step (before the sync); cProfile over {calls} steps:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/e2e_olmoe.json")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--cases", default="prefill,step,dense", help="comma list of prefill, step, dense")
    parser.add_argument("--merge", nargs="*", default=None, help="JSON files of partial runs to combine")
    parser.add_argument("--dynamic", action="store_true", help="compile with dynamic=True (cases marked 'dynamic')")
    parser.add_argument("--columns", default="", help="comma list of columns to keep (default: all)")
    parser.add_argument("--profile", action="store_true", help="only print the top kernels of a prefill, both backends")
    parser.add_argument("--host-profile", action="store_true",
                        help="only print where the host time of a 64 x 1 step goes (cProfile), without and with 2T-Drop")
    args = parser.parse_args()
    if args.profile:
        torch.manual_seed(0)
        model = olmoe(args.layers)
        inputs = {"input_ids": torch.randint(0, 50304, (1, 4096), device="cuda"), "use_cache": False}
        for backend, options in (("inductor", None), ("dualsparse", {"kernels": "triton"})):
            print(f"\n{backend}: GPU ms per kernel, prefill 1x4096")
            for name, t in top_kernels(model, inputs, backend, options):
                print(f"  {t:8.3f}  {name}")
        return
    if args.host_profile:
        return host_profile(args.layers)
    if args.merge:
        rows = [r for path in args.merge for r in json.load(open(path))["rows"]]
        meta = json.load(open(args.merge[0]))
        return finish(args.json, rows, meta["device"], meta["torch"])
    torch.manual_seed(0)
    rows = []
    model = olmoe(args.layers)
    wanted = args.cases.split(",")
    cases = {"prefill 1x4096": {"input_ids": torch.randint(0, 50304, (1, 4096), device="cuda"), "use_cache": False},
             "step 64x1": {"input_ids": torch.randint(0, 50304, (64, 1), device="cuda"), "use_cache": False}}
    cases = {k: v for k, v in cases.items() if k.split()[0] in wanted}
    kept = [c for c in args.columns.split(",") if c]
    plan = calibration_plan(model) if not kept or any("2T" in c for c in kept) else None
    columns = {"eager": (None, None), "inductor": ("inductor", None),
               "dualsparse": ("dualsparse", {"kernels": "triton"}),
               "dualsparse 2T 25%": ("dualsparse", two_t_options(plan))}
    columns.update({name + " RO": (backend, options) for name, (backend, options) in columns.items()
                    if backend is not None})
    if kept:
        columns = {k: v for k, v in columns.items() if k in kept}
    if args.dynamic:
        cases = {f"{k} dynamic": v for k, v in cases.items()}
    for case, inputs in cases.items():
        row = {"model": "OLMoE-shaped", "case": case}
        for column, (backend, options) in columns.items():
            dsmoe_compiler.reset_drop_stats()
            mode = "reduce-overhead" if column.endswith(" RO") else None
            row[column], row[column + " first call s"] = bench(model, inputs, backend, options, mode, args.dynamic or None)
            if options and options.get("drop"):
                row[column + " measured drop"] = dsmoe_compiler.drop_stats()["overall"]["drop_rate"]
            print(case, column, f"{row[column]:.2f} ms", flush=True)
        rows.append(row)
    del model, plan
    torch.cuda.empty_cache()
    if "dense" in wanted:
        dense = llama(args.layers)
        inputs = {"input_ids": torch.randint(0, 50304, (1, 4096), device="cuda"), "use_cache": False}
        row = {"model": "dense (Llama-shaped)", "case": "prefill 1x4096"}
        for column in ("inductor", "dualsparse"):
            row[column], row[column + " first call s"] = bench(dense, inputs, column, None)
        rows.append(row)
    finish(args.json, rows, torch.cuda.get_device_name(), torch.__version__)


def finish(path, rows, device, version):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": device, "torch": version, "rows": rows}, f, indent=1)
    for suffix in ("", " RO"):
        cols = [c + suffix for c in ("eager", "inductor", "dualsparse", "dualsparse 2T 25%") if c + suffix != "eager RO"]
        if suffix and not any(c in r for r in rows for c in cols):
            continue
        print("| model | case | " + " | ".join(cols) + " | dualsparse vs inductor | 2T 25% vs inductor | measured drop |")
        print("|---" * (len(cols) + 5) + "|")
        ind, ds, dd = "inductor" + suffix, "dualsparse" + suffix, "dualsparse 2T 25%" + suffix
        for r in rows:
            if ind not in r:
                continue
            vals = " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cols)
            ratio = f"{r[ind] / r[ds]:.2f}x" if ds in r else "-"
            drop_ratio = f"{r[ind] / r[dd]:.2f}x" if dd in r else "-"
            drop = f"{r[dd + ' measured drop']:.3f}" if dd + " measured drop" in r else "-"
            print(f"| {r['model']} | {r['case']} | {vals} | {ratio} | {drop_ratio} | {drop} |")


if __name__ == "__main__":
    main()
