"""Why our TF32 products are less exact than cuBLAS's: what each does to an fp32 operand's low 13 bits.

    PYTHONUNBUFFERED=1 python benchmarks/tf32_operands.py --json results/h200/tf32_operands.json

TF32 keeps 10 of fp32's 23 mantissa bits. Feed each path the same operands three ways: as they are, truncated to TF32
(low bits cleared) and rounded to TF32 (to nearest). A path that truncates gives the same output for "as they are"
and "truncated"; a path that rounds gives the same output for "as they are" and "rounded" (rounding twice is
rounding once). Paths: our grouped GEMMs (``moe_triton``, ``tl.dot`` with TF32) and the reference loop on cuBLAS
(``F.linear`` with TF32), both with torch's ``fp32_precision = "tf32"``, at OLMoE's sizes with a fixed (given)
routing. The error column is against fp64 experts on the operands as they are. Prints a table last, writes JSON.
"""

from __future__ import annotations

import argparse

import torch
from moe_layer import DEV, SHAPES, make_params, make_spec, print_markdown, rel_err, save_json

from dsmoe_compiler.codegen import dispatch, reference
from dsmoe_compiler.ir import RoutingSpec

LOW_BITS = (1 << 13) - 1  # the fp32 mantissa bits TF32 drops


def truncated(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.int32) & ~LOW_BITS).view(torch.float32)


def rounded(t: torch.Tensor) -> torch.Tensor:
    """To the nearest TF32 value, ties away from zero (PTX's cvt.rna.tf32.f32)."""
    return ((t.view(torch.int32) + (1 << 12)) & ~LOW_BITS).view(torch.float32)


def given_routing_case(name: str, tokens: int):
    """x and the expert weights in fp32, with the routing computed once and handed over as given ids and weights."""
    H, I, E, K, renorm, _ = SHAPES[name]
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec, torch.float32)
    x = torch.randn(tokens, H, device=DEV)
    _, weights, index = reference.route(x, params, spec)
    given = spec.replace(routing=RoutingSpec(score_func="given"), slots=("topk_index", "topk_weights", "gate_up", "down"))
    return x, [index, weights], params[1:], given


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="OLMoE")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default="results/h200/tf32_operands.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    x, routing, weights, spec = given_routing_case(args.shape, args.tokens)
    want = reference.moe(x.double(), routing + [w.double() for w in weights], spec)
    paths = {"ours (tl.dot)": dispatch.moe_triton, "cuBLAS (reference loop)": reference.moe}
    operands = {"as they are": lambda t: t, "truncated": truncated, "rounded": rounded}
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    rows = []
    try:
        for path, run in paths.items():
            outs = {how: run(f(x), routing + [f(w) for w in weights], spec) for how, f in operands.items()}
            for how, out in outs.items():
                rows.append({"path": path, "operands": how, "rel_err": rel_err(out, want),
                             "equals_as_they_are": bool(torch.equal(out, outs["as they are"]))})
                print(rows[-1], flush=True)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    save_json(args.json, rows, command=f"python benchmarks/tf32_operands.py --shape {args.shape} --tokens {args.tokens}")
    print_markdown(f"TF32 operands, {args.shape} {args.tokens} tokens: rel. err. against fp64 (operands as they are)",
                   ["path", "operands", "rel. err.", "output = as they are"],
                   [[r["path"], r["operands"], f"{r['rel_err']:.2e}", "yes" if r["equals_as_they_are"] else "no"]
                    for r in rows])


if __name__ == "__main__":
    main()
