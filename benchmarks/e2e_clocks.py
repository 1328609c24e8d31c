"""Clocks and power of the OLMoE-shaped prefill under inductor and under dualsparse (GPU).

    PYTHONUNBUFFERED=1 python benchmarks/e2e_clocks.py --json results/h200/e2e_clocks.json

Why: in the README's end-to-end profile the kernels that both backends run (cuDNN attention, the dense
projections) take 5-7 % longer under dualsparse, and docs/kernel-experiments.md ("The gap is the power cap") found
the H200 at its software power cap under sustained work. This script asks whether the two backends run at
different clocks. Both compiled prefills (1 x 4096 tokens, the model of e2e_olmoe.py) run back to back for
``--seconds`` each, alternating for ``--rounds`` rounds, while nvidia-smi samples SM clock, power and the active
throttle reasons every 50 ms. Then each backend's shared kernels are profiled in one call twice: after a 2 s pause
(full clocks) and right after a sustained phase (capped clocks). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_olmoe import olmoe  # noqa: E402

POWER_CAP = 0x4  # clocks_event_reasons: software power cap


def sampler(path: str) -> subprocess.Popen:
    query = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "50",
                             "-f", path])


def samples(path: str) -> list[tuple[float, float, float, int]]:
    """(unix time, SM MHz, W, throttle reasons) per nvidia-smi line."""
    rows = []
    with open(path) as f:
        for stamp, mhz, watts, reasons in csv.reader(f, skipinitialspace=True):
            t = time.mktime(time.strptime(stamp.split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + stamp.split(".")[1])
            rows.append((t, float(mhz), float(watts), int(reasons, 16)))
    return rows


def sustained(fn, seconds: float) -> tuple[float, float, float, int]:
    """Calls fn back to back for about ``seconds``: (start, end, ms per call, calls)."""
    torch.cuda.synchronize()
    start, calls = time.time(), 0
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    begin.record()
    while time.time() - start < seconds:
        fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start, time.time(), begin.elapsed_time(end) / calls, calls


def kernel_ms(fn) -> dict[str, float]:
    """GPU ms per kernel name over one call (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {ev.key: ev.device_time_total / 1e3 for ev in prof.key_averages() if ev.device_time_total > 0}


def shared_kernels(a: dict[str, float], b: dict[str, float], n: int = 6) -> list[str]:
    """The n kernel names both profiles have, by their time in a."""
    return sorted(set(a) & set(b), key=lambda k: -a[k])[:n]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="results/e2e_clocks.json")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = olmoe(args.layers)
    inputs = {"input_ids": torch.randint(0, 50304, (1, 4096), device="cuda"), "use_cache": False}
    backends = {"inductor": ("inductor", None), "dualsparse": ("dualsparse", {"kernels": "triton"})}
    fns = {}
    torch._dynamo.reset()
    for name, (backend, options) in backends.items():  # no reset between: dynamo keeps one entry per backend
        compiled = torch.compile(model, backend=backend, options=options)
        with torch.no_grad():
            compiled(**inputs)  # compile (and autotune) now, not inside the timed phases
        fns[name] = (lambda c: lambda: c(**inputs))(compiled)
    log = tempfile.NamedTemporaryFile(suffix=".csv", delete=False).name
    smi = sampler(log)
    time.sleep(1.0)
    phases = []
    with torch.no_grad():
        for name in backends:
            fns[name]()  # each backend's entry found again after the other's (any recompile happens here)
        graphs = dict(counters["stats"])
        for r in range(args.rounds):
            for name in backends:
                time.sleep(1.0)
                start, stop, ms, calls = sustained(fns[name], args.seconds)
                phases.append({"backend": name, "round": r, "start": start, "end": stop, "ms": ms, "calls": calls})
                print(f"round {r} {name}: {ms:.2f} ms per call over {calls} calls")
        profiles = {}
        for name in backends:
            time.sleep(2.0)
            rested = kernel_ms(fns[name])
            sustained(fns[name], 2.0)
            profiles[name] = {"rested": rested, "sustained": kernel_ms(fns[name])}
    if dict(counters["stats"]) != graphs:  # a recompile inside the timed phases would make them meaningless
        print(f"WARNING: dynamo compiled during the timed phases: {graphs} -> {dict(counters['stats'])}")
    time.sleep(0.5)
    smi.terminate()
    smi.wait()
    rows = samples(log)
    for p in phases:  # the samples inside the phase, its first 0.5 s left out (clocks settling)
        inside = [s for s in rows if p["start"] + 0.5 <= s[0] <= p["end"]]
        p.update(samples=len(inside), sm_mhz=statistics.median(s[1] for s in inside) if inside else None,
                 watts=statistics.median(s[2] for s in inside) if inside else None,
                 power_capped=sum(bool(s[3] & POWER_CAP) for s in inside) / max(1, len(inside)))
    names = shared_kernels(profiles["inductor"]["rested"], profiles["dualsparse"]["rested"])
    result = {"args": vars(args), "phases": phases, "profiles": profiles, "shared_kernels": names,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)

    print("\nshared kernels, ms in one call (rested: after a 2 s pause; sustained: right after 2 s of calls)")
    print(f"{'kernel':<60} {'ind. rested':>11} {'ds rested':>10} {'ind. sust.':>10} {'ds sust.':>9}")
    for k in names:
        cells = [profiles[b][w].get(k, 0.0) for w in ("rested", "sustained") for b in ("inductor", "dualsparse")]
        print(f"{k[:60]:<60} {cells[0]:>11.3f} {cells[1]:>10.3f} {cells[2]:>10.3f} {cells[3]:>9.3f}")
    print("\n| backend | round | ms per call | calls | median SM MHz | median W | samples at the power cap |")
    print("|---|---|---|---|---|---|---|")
    for p in phases:
        print(f"| {p['backend']} | {p['round']} | {p['ms']:.2f} | {p['calls']} | {p['sm_mhz']} | {p['watts']} | "
              f"{p['power_capped']:.0%} of {p['samples']} |")


if __name__ == "__main__":
    main()
