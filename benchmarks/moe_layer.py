"""One MoE layer in bf16 on the GPU: our Triton kernels against transformers' experts and the floor.

    PYTHONUNBUFFERED=1 python benchmarks/moe_layer.py --json results/moe_layer.json

Columns (ms, median of triton.testing.do_bench): ours eager / ours replayed from a CUDA graph;
transformers OlmoeTopKRouter + OlmoeExperts with experts implementation "eager", "grouped_mm", and
"grouped_mm" under torch.compile (inductor); floor = max(FLOPs / GEMM peak, bytes of the touched
experts / copy bandwidth), both ceilings measured at the start of this run. FLOPs = 6 T k H I (the
router GEMM is left out, as in the anchors). Every configuration is first checked against
reference.moe in bf16 (relative error < 1e-2). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import triton
from triton.testing import do_bench

from dsmoe_compiler.codegen import dispatch, reference
from dsmoe_compiler.ir import ExpertsSpec, MoESpec, RoutingSpec, SharedSpec

SHAPES = {  # name: (hidden, intermediate, experts, top-k, renormalise, shared intermediate)
    "Mixtral": (4096, 14336, 8, 2, True, None),
    "OLMoE": (2048, 1024, 64, 8, False, None),
    "DeepSeek-V2-Lite": (2048, 1408, 64, 6, False, 2 * 1408),
    "Qwen3-30B-A3B": (2048, 768, 128, 8, True, None),
}
TOKENS = (16, 256, 4096, 16384)
DEV = os.environ.get("BENCH_DEVICE", "cuda")


def median_ms(fn) -> float:
    """Median of do_bench over at least 30 repetitions (a 20 ms layer gets 600 ms, not 100 ms, of samples)."""
    estimate = do_bench(fn, warmup=5, rep=20, return_mode="median")
    return float(do_bench(fn, warmup=25, rep=max(100, 30 * estimate), return_mode="median"))


def parse_cases(text: str) -> list[tuple[str, int]]:
    """'OLMoE:4096,Mixtral:16384' -> [("OLMoE", 4096), ("Mixtral", 16384)] (the --cases of the GPU scripts)."""
    return [(name, int(tokens)) for name, tokens in (case.split(":") for case in text.split(","))]


def print_markdown(title: str, header: list[str], lines: list[list[str]]) -> None:
    """A GPU script's closing table: its title line, then a markdown table."""
    print(title)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def save_json(path: str, rows: list, **extra) -> None:
    """A benchmark's result file: the machine and versions, the script's extra fields, then its rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                   **extra, "rows": rows}, f, indent=1)


def cuda_graph(fn) -> torch.cuda.CUDAGraph:
    """One CUDA graph of fn, which has run once already (compiled, autotuned, its buffers allocated)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def host_ms(fn, calls=50) -> float:
    """Host time per call when the GPU keeps up: launch overhead of the eager path."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def ceilings() -> tuple[float, float]:
    """(bf16 GEMM peak in FLOP/s, copy bandwidth in B/s counting read + write), measured here."""
    a, b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16), torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / (median_ms(lambda: a @ b) * 1e-3)
    src = torch.randn(512 * 2 ** 20, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (median_ms(lambda: dst.copy_(src)) * 1e-3)
    del a, b, src, dst
    return peak, bw


def make_spec(H, I, E, K, renorm, shared=None, **kw) -> MoESpec:
    slots = ["router_weight", "gate_up", "down"] + (["shared_gate", "shared_up", "shared_down"] if shared else [])
    ex = {k: kw.pop(k) for k in ("interleaved", "transposed", "has_bias", "activation") if k in kw}
    if ex.get("has_bias"):
        slots += ["gate_up_bias", "down_bias"]
    return MoESpec(name="bench", num_experts=E, top_k=K, hidden=H, intermediate=I,
                   routing=kw.pop("routing", RoutingSpec(renormalize=renorm)), experts=ExpertsSpec(**ex),
                   shared=SharedSpec(intermediate=shared) if shared else None, slots=tuple(slots), **kw)


def make_params(spec: MoESpec, dtype=torch.bfloat16):
    H, I, E = spec.hidden, spec.intermediate, spec.num_experts
    ex = spec.experts
    shapes = {"router_weight": (E, H), "gate_up": (E, H, 2 * I) if ex.transposed else (E, 2 * I, H),
              "down": (E, I, H) if ex.transposed else (E, H, I), "gate_up_bias": (E, 2 * I), "down_bias": (E, H)}
    if spec.shared:
        S = spec.shared.intermediate
        shapes |= {"shared_gate": (S, H), "shared_up": (S, H), "shared_down": (H, S)}
    fan_in = {"down": I, "shared_down": spec.shared.intermediate if spec.shared else 1}
    return [torch.randn(shapes[s], device=DEV, dtype=dtype) * (0.1 if "bias" in s else fan_in.get(s, H) ** -0.5)
            for s in spec.slots]


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_variants() -> list[dict]:
    """bf16 on the GPU for the layouts the big table does not cover: GPT-OSS, P > 1 with drops, sigmoid + shared."""
    rows = []
    cases = {
        "gptoss interleaved+transposed+bias": make_spec(512, 384, 16, 4, False, interleaved=True, transposed=True,
                                                         has_bias=True, activation="gptoss",
                                                         routing=RoutingSpec(score_after_topk=True)),
        "P=2 partial": make_spec(512, 384, 16, 4, True, partition=2),
        "P=4 partial": make_spec(512, 384, 16, 4, True, partition=4),
        "sigmoid+renorm+scale+shared": make_spec(512, 384, 16, 4, True, shared=256,
                                               routing=RoutingSpec(score_func="sigmoid", renormalize=True, scale=2.5)),
    }
    for name, spec in cases.items():
        params = make_params(spec)
        for T in (1, 37, 1000):
            x = torch.randn(T, spec.hidden, device=DEV, dtype=torch.bfloat16)
            err = rel_err(dispatch.moe_triton(x, params, spec), reference.moe(x, params, spec))
            rows.append({"case": name, "tokens": T, "rel_err": err})
            print(f"check {name:40s} T={T:5d} rel_err={err:.2e}", flush=True)
    # dropped pairs: compare against reference.experts with the same keep mask
    spec = cases["P=2 partial"]
    params = make_params(spec)
    x = torch.randn(500, spec.hidden, device=DEV, dtype=torch.bfloat16)
    keep = torch.rand(500, spec.top_k * 2, device=DEV) > 0.25
    out = dispatch.moe_triton(x, params, spec, keep=keep)
    for routed_by in ("reference", "ours"):  # ours: the same top-k as the kernels, so bf16 ties cannot differ
        if routed_by == "reference":
            _, w, idx = reference.route(x, params, spec)
        else:
            w, idx = dispatch.route(x, params, spec)
        idx, w = reference.partial_transform(idx.long(), w, 2)
        ref = reference.experts(x, idx, w, params, spec, keep=keep)
        err = rel_err(out, ref)
        bad = int(((out.float() - ref.float()).norm(dim=1) > 0.05 * ref.float().norm(dim=1).clamp_min(1e-3)).sum())
        name = f"P=2, 25% pairs dropped, routed by {routed_by}"
        rows.append({"case": name, "tokens": 500, "rel_err": err, "tokens_off_by_5pct": bad})
        print(f"check {name:40s} T=  500 rel_err={err:.2e} tokens off by >5%: {bad}", flush=True)
    rows += layout_rows()
    return rows


def layout_rows() -> list[dict]:
    """OLMoE-shaped experts stored fused, as separate 3-D tensors and as a ModuleList: same kernels, timed."""
    from dataclasses import replace

    rows = []
    spec = make_spec(*SHAPES["OLMoE"][:5])
    params = make_params(spec)
    E, I = spec.num_experts, spec.intermediate
    gate, up = params[1][:, :I].contiguous(), params[1][:, I:].contiguous()
    layouts = {"fused": (spec, params),
               "separate": (replace(spec, experts=replace(spec.experts, layout="separate"),
                                    slots=("router_weight", "gate", "up", "down")), [params[0], gate, up, params[2]]),
               "list": (replace(spec, experts=replace(spec.experts, layout="list"),
                                slots=("router_weight",) + tuple(f"{r}.{e}" for e in range(E) for r in ("gate", "up", "down"))),
                        [params[0]] + [t[e].clone() for e in range(E) for t in (gate, up, params[2])])}
    for T in (16, 4096):
        x = torch.randn(T, spec.hidden, device=DEV, dtype=torch.bfloat16)
        for name, (s, p) in layouts.items():
            fn = lambda: dispatch.moe_triton(x, p, s)  # noqa: E731
            err = rel_err(fn(), reference.moe(x, p, s))
            row = {"case": f"OLMoE layout {name}", "tokens": T, "rel_err": err,
                   "ours_graph": median_ms(cuda_graph(fn).replay)}
            rows.append(row)
            print(f"check {row['case']:40s} T={T:5d} rel_err={err:.2e} graph {row['ours_graph']:.3f} ms", flush=True)
    return rows


def transformers_layer(H, I, E, K, renorm, params, impl, dtype=torch.bfloat16):
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts, OlmoeTopKRouter

    config = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=renorm)
    config._experts_implementation = impl
    router, experts = OlmoeTopKRouter(config).to(DEV, dtype), OlmoeExperts(config).to(DEV, dtype)
    router.weight.data, experts.gate_up_proj.data, experts.down_proj.data = params[0], params[1], params[2]

    def layer(x):
        _, weights, index = router(x)
        return experts(x, index, weights)
    return layer


def run_shape(name, H, I, E, K, renorm, shared, peak, bw, skip_eager_at):
    rows = []
    spec = make_spec(H, I, E, K, renorm)
    params = make_params(spec)
    try:
        impls = {"hf_eager": transformers_layer(H, I, E, K, renorm, params, "eager"),
                 "hf_grouped_mm": transformers_layer(H, I, E, K, renorm, params, "grouped_mm")}
        impls["hf_gmm_inductor"] = torch.compile(impls["hf_grouped_mm"])
    except Exception as e:  # keep our numbers even if this transformers version builds the modules differently
        print(f"transformers baselines unavailable: {e!r}", flush=True)
        impls = {}
    for T in TOKENS:
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        ours = lambda: dispatch.moe_triton(x, params, spec)  # noqa: E731
        err = rel_err(ours(), reference.moe(x, params, spec))
        _, _, index = reference.route(x, params, spec)
        touched = int(torch.unique(index).numel())
        flops = 6 * T * K * H * I
        floor = max(flops / peak, touched * 3 * H * I * 2 / bw) * 1e3
        row = {"shape": name, "tokens": T, "rel_err": err, "floor": floor, "touched_experts": touched,
               "ours": median_ms(ours)}
        row["ours_graph"] = median_ms(cuda_graph(ours).replay)
        row["ours_host"] = host_ms(ours)
        for key, fn in impls.items():
            if key == "hf_eager" and T >= skip_eager_at:
                row[key] = None
                continue
            try:
                row[key] = median_ms(lambda: fn(x))
            except Exception as e:
                print(f"{key} failed at {name} T={T}: {e!r}", flush=True)
                row[key] = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    if shared:  # the same layer with its shared experts (ours only; the rows above are routed experts alone)
        spec_s = make_spec(H, I, E, K, renorm, shared=shared)
        params_s = params + make_params(spec_s)[3:]
        for T in TOKENS:
            x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
            ours = lambda: dispatch.moe_triton(x, params_s, spec_s)  # noqa: E731
            row = {"shape": name + "+shared", "tokens": T, "rel_err": rel_err(ours(), reference.moe(x, params_s, spec_s)),
                   "ours": median_ms(ours)}
            row["ours_graph"] = median_ms(cuda_graph(ours).replay)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def fmt(v, digits=3):
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def table(rows) -> str:
    cols = ["shape", "tokens", "floor", "ours", "ours_graph", "ours_host", "hf_eager", "hf_grouped_mm", "hf_gmm_inductor",
            "best_peer", "graph/floor", "rel_err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        peers = [r.get(k) for k in ("hf_eager", "hf_grouped_mm", "hf_gmm_inductor") if r.get(k) is not None]
        r = dict(r, best_peer=min(peers) if peers else None,
                 **{"graph/floor": r["ours_graph"] / r["floor"] if r.get("floor") else None})
        lines.append("| " + " | ".join(fmt(r.get(c), 2 if c == "graph/floor" else 3) if c != "rel_err"
                                       else f"{r['rel_err']:.1e}" for c in cols) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/moe_layer.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--skip-eager-at", type=int, default=16384, help="skip transformers eager from this many tokens")
    args = ap.parse_args()
    start = time.time()
    torch.manual_seed(0)
    checks = check_variants()
    peak, bw = ceilings()
    print(f"measured: bf16 GEMM {peak / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in args.shapes.split(","):
        rows += run_shape(name, *SHAPES[name], peak, bw, args.skip_eager_at)
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "gemm_peak_tflops": peak / 1e12, "copy_tbps": bw / 1e12,
              "checks": checks, "rows": rows, "seconds": time.time() - start}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, torch {torch.__version__}, triton {triton.__version__}; "
          f"GEMM peak {peak / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s; ms, median of do_bench; "
          f"{time.time() - start:.0f} s")
    print(table(rows))


if __name__ == "__main__":
    main()
