"""Does a 192-row "super tile" fit in registers? Compiled for sm_90a on any machine (no GPU needed).

    python benchmarks/super_tile_regs.py --json results/super_tile_regs.json

The last full 128-row tile of an expert could take that expert's short tail (at most 64 rows) in the same
program: a second accumulator that shares each K step's weight block, so that the tail neither re-reads
the weights nor pays for 64 empty rows. This builds a stripped-down stacked gate/up tile, x gathered
by token and [gate; up] through a tensor descriptor, as ``codegen/gate_up_glu.py`` does, with and
without the second accumulator. It compiles for Hopper with Triton's own ptxas and prints what ptxas
reports: registers, spills, shared memory. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def stacked_tile(x_ptr, w_ptr, h_ptr, rows_ptr, n_rows, tail_rows, E, I, K, stride_xt, stride_hm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_M: tl.constexpr):
    """h = silu(x W_gate) * (x W_up) for BLOCK_M gathered rows, plus TAIL_M more on a second accumulator."""
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, 2, I, K], strides=[2 * I * K, I * K, K, 1],
                                       block_shape=[1, 2, BLOCK_N, BLOCK_K])
    offs_m, offs_t, offs_k = tl.arange(0, BLOCK_M), tl.arange(0, max(TAIL_M, 16)), tl.arange(0, BLOCK_K)
    token = tl.load(rows_ptr + offs_m, mask=offs_m < n_rows, other=0)
    x_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    tail_token = tl.load(rows_ptr + BLOCK_M + offs_t, mask=offs_t < tail_rows, other=0)
    t_ptrs = x_ptr + tail_token[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((max(TAIL_M, 16), 2 * BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        w = w_desc.load([0, 0, tl.program_id(0) * BLOCK_N, k * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K)
        acc = tl.dot(tl.load(x_ptrs, mask=(offs_m < n_rows)[:, None], other=0.0), w.T, acc)
        if TAIL_M > 0:
            acc_t = tl.dot(tl.load(t_ptrs, mask=(offs_t < tail_rows)[:, None], other=0.0), w.T, acc_t)
        x_ptrs += BLOCK_K
        t_ptrs += BLOCK_K
    offs_n = tl.arange(0, BLOCK_N)
    gate, up = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :], (gate * tl.sigmoid(gate) * up).to(tl.bfloat16))
    if TAIL_M > 0:
        gate, up = acc_t.reshape(max(TAIL_M, 16), 2, BLOCK_N).permute(0, 2, 1).split()
        tl.store(h_ptr + (BLOCK_M + offs_t)[:, None] * stride_hm + offs_n[None, :],
                 (gate * tl.sigmoid(gate) * up).to(tl.bfloat16), mask=(offs_t < TAIL_M)[:, None])


def ptxas_report(ptx: str) -> str:
    """ptxas -v on Triton's bundled assembler (the Blackwell one where the PTX is newer than the other accepts)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    for name in ("ptxas", "ptxas-blackwell"):
        run = subprocess.run([os.path.join(bin_dir, name), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        if run.returncode == 0:
            return run.stderr
    raise SystemExit(f"ptxas failed: {run.stderr[-500:]}")


def compile_case(tail_m: int, stages: int) -> dict:
    names = stacked_tile.arg_names
    consts = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, TAIL_M=tail_m)
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "rows_ptr": "*i32"}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = triton.compiler.ASTSource(stacked_tile, signature,
                                    constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=stages))
    report = ptxas_report(compiled.asm["ptx"])
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return {"rows": 128 + tail_m, "tail_rows": tail_m, "stages": stages, "registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads"),
            "shared_bytes": compiled.metadata.shared}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/super_tile_regs.json")
    args = ap.parse_args()
    rows = [compile_case(tail_m, stages) for tail_m, stages in [(0, 3), (32, 3), (64, 3), (64, 4)]]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"triton": triton.__version__, "target": "sm_90a, 8 warps, 128 x (2 x 128) x 64", "rows": rows}, f,
                  indent=1)
    print(f"triton {triton.__version__}, sm_90a, 8 warps, a 128 x (2 x 128) stacked gate/up tile, K steps of 64")
    print("| rows (full + tail) | stages | registers / thread | spill stores (B) | spill loads (B) | shared (B) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| 128 + {r['tail_rows']} | {r['stages']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} "
              f"| {r['shared_bytes']} |")


if __name__ == "__main__":
    main()
