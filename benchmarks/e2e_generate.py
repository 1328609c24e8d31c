"""Serving through transformers' ``generate`` on the GPU: the OLMoE-1B-7B-shaped model of ``e2e_olmoe.py``.

    PYTHONUNBUFFERED=1 python benchmarks/e2e_generate.py --json results/h200/e2e_generate.json

Each case is a batch of B prompts of ``--prompt`` random tokens, greedy, exactly ``--new`` new tokens, with
transformers' static cache. Columns: transformers without compile (``disable_compile=True``), transformers' own
compile of the decode steps with inductor and with dualsparse, without CUDA graphs (``CompileConfig(mode="default")``,
``CompileConfig(backend="dualsparse", mode=None, options={"kernels": "triton"})``) and with them ("RO":
``CompileConfig()``, whose default mode is reduce-overhead, and ``options={"mode": "reduce-overhead", ...}``), and
dualsparse with 2T-Drop fitted to 25 % compute drop under reduce-overhead. transformers runs the prefill without
compile in every column, as it does by default. Time: wall seconds of a whole ``generate`` call (synchronised), the
median of ``--repeats`` calls after two warm-up calls (the first compiles); tokens/s = B * new / time. "same tokens"
is the share of the new tokens equal to the first column's: the uncompiled one, unless ``--columns`` leaves it out
(bf16: greedy choices may part on near ties; no assert).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import dsmoe_compiler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_olmoe import calibration_plan, olmoe, two_t_options  # noqa: E402


def compile_configs(plan) -> dict:
    from transformers import CompileConfig

    ours = {"kernels": "triton"}
    ours_ro = {**ours, "mode": "reduce-overhead"}
    return {"no compile": None,
            "inductor": CompileConfig(mode="default"),
            "dualsparse": CompileConfig(backend="dualsparse", mode=None, options=ours),
            "inductor RO": CompileConfig(),
            "dualsparse RO": CompileConfig(backend="dualsparse", mode=None, options=ours_ro),
            "dualsparse 2T 25% RO": CompileConfig(backend="dualsparse", mode=None,
                                                  options={**two_t_options(plan), **ours_ro})}


def generate_settings(model_config, ids, new: int, config, reuse_cache: bool = False) -> dict:
    """``generate``'s arguments: exactly ``new`` greedy tokens, a static cache, transformers' compile of the decode steps
    by ``config`` (None: no compile). ``reuse_cache``: one ``StaticCache`` (in ``past_key_values``) for every call,
    reset before each, as a server would keep it; without it each call makes a new cache, whose new addresses make
    CUDA graphs re-record every decode step."""
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if reuse_cache:
        from transformers import StaticCache

        settings["past_key_values"] = StaticCache(config=model_config, max_cache_len=ids.shape[1] + new)
    else:
        settings["cache_implementation"] = "static"
    if config is None:
        settings["disable_compile"] = True
    else:
        settings["compile_config"] = config
    return settings


def timed_generate(model, ids, new: int, config, repeats: int, reuse_cache: bool = False):
    settings = generate_settings(model.config, ids, new, config, reuse_cache)
    cache = settings.get("past_key_values")
    seconds, out = [], None
    with torch.no_grad():
        for i in range(repeats + 2):
            if cache is not None:
                cache.reset()
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **settings)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return seconds[0], statistics.median(seconds[2:]), out[:, ids.shape[1]:]


def profile_decode(model, batch: int, prompt: int, new: int = 16):
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    configs = compile_configs(None)
    ids = torch.randint(3, 50304, (batch, prompt), device="cuda")
    for name in ("inductor", "dualsparse"):
        torch._dynamo.reset()
        counters.clear()
        timed_generate(model, ids, new, configs[name], 1)  # compiles and warms up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
            model.generate(ids, **generate_settings(model.config, ids, new, configs[name]))
            torch.cuda.synchronize()
        print(f"== {name}: counters", {k: dict(v) for k, v in counters.items()
                                       if k in ("stats", "recompiles", "graph_break", "unimplemented")})
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def save(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/h200/e2e_generate.json")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--columns", default=None, help="comma list of column names to run (default: all)")
    parser.add_argument("--reuse-cache", action="store_true", help="one StaticCache for all calls of a column")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one generate of 16 tokens at the first batch size, inductor and dualsparse "
                             "without CUDA graphs: dynamo counters and the top CUDA kernels")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = olmoe(args.layers)
    model.generation_config.eos_token_id = None  # random weights: run every case to exactly --new tokens
    model.generation_config.pad_token_id = 0
    if args.profile:
        return profile_decode(model, int(args.batches.split(",")[0]), args.prompt)
    configs = compile_configs(calibration_plan(model))
    if args.columns:
        configs = {name: configs[name] for name in args.columns.split(",")}
    rows = []
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(3, 50304, (batch, args.prompt), device="cuda")
        row, baseline = {"batch": batch, "prompt": args.prompt, "new": args.new, "reuse cache": args.reuse_cache}, None
        for name, config in configs.items():
            torch._dynamo.reset()
            dsmoe_compiler.reset_drop_stats()
            first, median, tokens = timed_generate(model, ids, args.new, config, args.repeats, args.reuse_cache)
            baseline = tokens if baseline is None else baseline
            row[name] = {"s": median, "tokens/s": batch * args.new / median, "first call s": first,
                         "same tokens": (tokens == baseline).float().mean().item()}
            print(f"B={batch} {name}: {median * 1e3:.1f} ms, {batch * args.new / median:.0f} tokens/s, "
                  f"first call {first:.1f} s", flush=True)
            save(args.json, rows + [row])  # after every column: a run cut short keeps what it measured
        rows.append(row)
    if args.columns:  # the table below compares all the columns
        return
    names = list(configs)
    print(f"\ngenerate, prompt {args.prompt}, {args.new} new tokens, static cache; ms per call (tokens/s)")
    print("| B | " + " | ".join(names) + " | dualsparse vs inductor | RO: dualsparse / 2T vs inductor | same tokens |")
    print("|---" * (len(names) + 4) + "|")
    for r in rows:
        cells = " | ".join(f"{r[n]['s'] * 1e3:.1f} ({r[n]['tokens/s']:.0f})" for n in names)
        plain, ro = r["inductor"]["s"], r["inductor RO"]["s"]
        print(f"| {r['batch']} | {cells} | {plain / r['dualsparse']['s']:.2f}x | {ro / r['dualsparse RO']['s']:.2f}x / "
              f"{ro / r['dualsparse 2T 25% RO']['s']:.2f}x | {r['dualsparse']['same tokens']:.3f} |")


if __name__ == "__main__":
    main()
