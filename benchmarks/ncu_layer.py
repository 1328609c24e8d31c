"""One MoE layer's grouped GEMMs under Nsight Compute: what limits them (GPU, bf16).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python benchmarks/ncu_layer.py --shape OLMoE --tokens 4096

Autotunes first (every config runs outside the profiled range), then profiles one call of the layer
between cudaProfilerStart/Stop, so ncu sees each kernel of the layer once with its chosen config.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import SHAPES, make_params, make_spec  # noqa: E402

from dsmoe_compiler.codegen import dispatch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="OLMoE")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    H, I, E, K, renorm, _ = SHAPES[args.shape]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec)
    x = torch.randn(args.tokens, H, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # autotuning and the recorded launches happen here, outside the profiled range
        dispatch.moe_triton(x, params, spec)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    dispatch.moe_triton(x, params, spec)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
