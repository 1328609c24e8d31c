"""Peak resident memory of Major/Minor reconstruction on a CPU OLMoE-shaped model (issue 5).

    python benchmarks/reconstruct_memory.py [--hidden 1024] [--inter 1024] [--experts 32] [--layers 4]

Each measurement runs in a fresh process: build the model, load a plan calibrated beforehand, reset the
kernel's peak-RSS counter (``/proc/self/clear_refs``), apply the plan, read VmHWM (peak) and VmRSS.
Compares the in-place pass with a naive out-of-place reorder (new tensors indexed by the order).
Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _model(args):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.OlmoeConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.inter,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                      num_experts=args.experts, num_experts_per_tok=8)
    return transformers.OlmoeForCausalLM(config).eval()


def _naive(model, plan):
    """Out-of-place reorder: what an implementation without in-place permutation would do."""
    import torch

    from dsmoe_compiler.runtime.calibrate import find_experts

    with torch.no_grad():
        for name, module, _ in find_experts(model):
            order = plan.layers[name].order
            I = order.shape[1]
            rows = torch.cat([order, order + I], dim=1)
            module.gate_up_proj.data = torch.stack([module.gate_up_proj[e, rows[e]] for e in range(len(order))])
            module.down_proj.data = torch.stack([module.down_proj[e][:, order[e]] for e in range(len(order))])


def _warm_up(plan, model):
    """Run the same code paths on small tensors first, so that lazily loaded code and allocator
    arenas are not counted as the reconstruction's memory."""
    import torch

    from dsmoe_compiler.ir import ExpertsSpec
    from dsmoe_compiler.passes.reconstruct import permute_experts_

    plan.check(model)
    order = torch.stack([torch.randperm(8) for _ in range(2)])
    permute_experts_({"gate_up": torch.randn(2, 16, 4), "down": torch.randn(2, 4, 8)}, ExpertsSpec(), order)
    torch.stack([torch.randn(16, 4)[torch.cat([order[0], order[0] + 8])] for _ in range(2)])


def measure(args):
    import torch

    import dsmoe_compiler
    from dsmoe_compiler.passes.reconstruct import reconstruct_

    torch.set_num_threads(1)
    model = _model(args)
    plan = dsmoe_compiler.Plan.load(args.plan)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    _warm_up(plan, model)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t = time.perf_counter()
    if args.mode == "inplace":
        reconstruct_(model, plan)
    else:
        _naive(model, plan)
    seconds = time.perf_counter() - t
    gc.collect()
    print(json.dumps({"mode": args.mode, "weights_MiB": weights / 2**20, "expert_weights_MiB": experts / 2**20,
                      "rss_before_MiB": before / 2**20, "peak_during_MiB": _status("VmHWM") / 2**20,
                      "rss_after_MiB": _status("VmRSS") / 2**20,
                      "peak_extra_MiB": (_status("VmHWM") - before) / 2**20, "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mode", choices=["inplace", "naive"])
    ap.add_argument("--plan")
    args = ap.parse_args()
    if args.mode:
        return measure(args)
    import torch

    import dsmoe_compiler

    with tempfile.TemporaryDirectory() as tmp:
        plan_path = os.path.join(tmp, "plan.safetensors")
        model = _model(args)
        ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(1))
        dsmoe_compiler.calibrate(model, [ids], progress=False).save(plan_path)
        del model
        base = [sys.executable, __file__, "--hidden", str(args.hidden), "--inter", str(args.inter),
                "--experts", str(args.experts), "--layers", str(args.layers), "--plan", plan_path]
        for mode in ("inplace", "naive"):
            print(subprocess.run(base + ["--mode", mode], capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
