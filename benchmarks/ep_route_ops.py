"""Host work of the EP route operator: the torch ops one ``dualsparse::ep_route`` call launches (CPU, gloo, one rank).

    python benchmarks/ep_route_ops.py

At 4096 tokens per rank the EP layer is host-bound on the GPU (README, "Multi-GPU benchmark"), and each op
is a kernel launch there. Counts the aten ops directly under the operator (torch.profiler) for an
OLMoE-like block with P = 1 and with P = 2 (partial, nested units), dropping off. No timing.
"""

import os

import torch
import torch.distributed as dist

from dsmoe_compiler.ir import MoESpec
from dsmoe_compiler.runtime import ep


def route_ops(P: int, E: int = 64, H: int = 256, I: int = 128, K: int = 8, T: int = 512) -> list[str]:
    g = torch.Generator().manual_seed(0)
    spec = MoESpec(name=f"ops{P}", num_experts=E, top_k=K, hidden=H, intermediate=I, partition=P,
                   slots=("router_weight", "gate_up", "down"))
    params = [torch.randn(E, H, generator=g) * 0.1, torch.randn(E, 2 * I, H, generator=g) * 0.05,
              torch.randn(E, H, I, generator=g) * 0.05]
    x = torch.randn(T, H, generator=g)
    spec_json, ep_json = spec.to_json(), ep.ep_spec_for(spec).to_json()
    ep.ep_route(x, params, spec_json, ep_json)  # first call: the spec check
    with torch.profiler.profile() as prof:
        ep.ep_route(x, params, spec_json, ep_json)
    return [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is not None
            and e.cpu_parent.name == "dualsparse::ep_route"]


def main():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = [(P, route_ops(P)) for P in (1, 2)]
    dist.destroy_process_group()
    print("| P | aten ops per ep_route call |\n|---|---|")
    for P, ops in rows:
        print(f"| {P} | {len(ops)} |")


if __name__ == "__main__":
    main()
