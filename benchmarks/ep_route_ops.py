"""Host work of the EP route operator: what one ``dualsparse::ep_route`` call launches (CPU, gloo, one rank).

    python benchmarks/ep_route_ops.py

At 4096 tokens per rank the EP layer is host-bound on the GPU (README, "Multi-GPU benchmark"), and each op
is a kernel launch there. Counts, for an OLMoE-like block with P = 1 and with P = 2 (partial, nested units),
dropping off and 2T with uniform and with load-aware (literal) thresholds: the aten ops directly under the operator (torch.profiler) and
the Triton kernels it launches (``codegen/launch.launch`` calls), for impl "reference" (torch ops) and impl
"triton" (the kernels, run by the interpreter: the script re-runs itself with TRITON_INTERPRET=1). No timing.
"""

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from dsmoe_compiler.ir import DropSpec, MoESpec
from dsmoe_compiler.runtime import ep, load_aware, state


def route_ops(P: int, drop: str, policy: str | None, impl: str, E: int = 64, H: int = 256, I: int = 128, K: int = 8,
              T: int = 256):
    """(aten ops, Triton launches) of one ep_route call after a first one."""
    from dsmoe_compiler.codegen import dispatch, exchange_sizes, gather_rows, load_policy

    launchers = (dispatch, gather_rows, load_policy, exchange_sizes)  # modules whose kernels the route launches

    g = torch.Generator().manual_seed(0)
    key = state.register("ops", 0.1, 0.15, "cpu", False) if drop != "none" else ""
    spec = MoESpec(name=f"ops{P}{drop}", num_experts=E, top_k=K, hidden=H, intermediate=I, partition=P,
                   drop=DropSpec(mode=drop, key=key), slots=("router_weight", "gate_up", "down"))
    params = [torch.randn(E, H, generator=g) * 0.1, torch.randn(E, 2 * I, H, generator=g) * 0.05,
              torch.randn(E, H, I, generator=g) * 0.05]
    x = torch.randn(T, H, generator=g)
    spec_json, ep_json = spec.to_json(), ep.ep_spec_for(spec).to_json()
    load_aware.set_policy(policy)
    ep.ep_route(x, params, spec_json, ep_json, impl)  # first call: the spec check
    launches, real = [], dispatch.launch
    assert all(m.launch is real for m in launchers)

    def counted(kernel, *args):  # the interpreter's own torch ops stay under this record, not under ep_route
        launches.append(kernel)
        with torch.profiler.record_function("triton launch"):
            real(kernel, *args)

    for m in launchers:
        m.launch = counted
    with torch.profiler.profile() as prof:
        ep.ep_route(x, params, spec_json, ep_json, impl)
    for m in launchers:
        m.launch = real
    load_aware.set_policy(None)
    aten = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is not None
            and e.cpu_parent.name == "dualsparse::ep_route"]
    return len(aten), len(launches)


def main():
    impl = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541" if impl == "reference" else "29542")
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = [(P, drop, policy, *route_ops(P, drop, policy, impl))
            for P, drop, policy in ((1, "none", None), (2, "none", None), (2, "2t", None), (2, "2t", "literal"))]
    dist.destroy_process_group()
    if impl == "triton":
        print(repr(rows))
        return
    run = subprocess.run([sys.executable, __file__], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, check=True)
    fused = dict(((P, drop, policy), (a, k)) for P, drop, policy, a, k in
                 eval(run.stdout.strip().splitlines()[-1]))  # noqa: S307
    print("| P | drop | policy | torch ops (impl reference) | torch ops + Triton launches (impl triton) |\n"
          "|---|---|---|---|---|")
    for P, drop, policy, aten, _ in rows:
        a, k = fused[(P, drop, policy)]
        print(f"| {P} | {drop} | {policy or 'uniform'} | {aten} | {a} + {k} |")


if __name__ == "__main__":
    main()
