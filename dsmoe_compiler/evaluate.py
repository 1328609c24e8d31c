"""Accuracy versus compute drop on the shipped MoE: ``python -m dsmoe_compiler eval`` and ``demo``.

Every setting is one ``torch.compile(model, backend="dualsparse", options=...)`` of a freshly loaded
model (reconstruction permutes weights in place), run on the same held-out tokens:

- data: the ``test`` split of ``data/pydocs`` (never seen in training or calibration), cut into
  non-overlapping windows of ``SEQ`` bytes; every position but the first of a window is predicted.
  Calibration (neuron importance, score samples for the thresholds) runs on the ``calib`` split.
- metrics: next-byte accuracy, perplexity (exp of the mean NLL), and, for each, the difference to
  the no-drop run on the same tokens with a standard error clustered by window (tokens of one
  window are correlated); optionally a multiple-choice task (below).
- measured drop rate: the compute-weighted rate counted by the compiled operators on the evaluated
  tokens (``dsmoe_compiler.drop_stats()``), reported beside the requested one. Thresholds are fitted
  on the calibration scores (``drop_rate``); all 2T variants get the same thresholds, and their
  measured rates differ only because drops in earlier layers change later layers' routing.

Settings (``METHODS``): ``none``; ``1t``; ``2t-natural`` (checkpoint neuron order), ``2t-random``
(a fixed random order), ``2t-<metric>`` (reconstruction by each of the four importance metrics);
``1t-per_layer`` / ``2t-abs_gate-per_layer`` (each layer gets its own threshold, same rate in every
layer, instead of one global threshold); ``skip`` (Lu et al.'s expert skipping generalised to top-k:
drop a pair whose score < beta * the token's top score, beta fitted to the rate); at their own rates
only: ``topk`` (static top-(k-1)) and ``skip-median`` (beta = the calibration median of score / top
score over the non-top pairs, Lu et al.'s choice).

Multiple choice (``--mc-items``): an item is a context of ``MC_CONTEXT`` bytes of test text ending
at a line start, the true next ``MC_CHOICE`` bytes, and three continuations of the same length taken
at other line starts of the test text (all four distinct); the model picks the one with the highest
log-likelihood given the context. Chance is 25 %; with a few hundred items its standard error is
several points, so it is a sanity check, not a fine comparison.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


def shipped(relative: str) -> pathlib.Path:
    """Where a file the repository ships (the checkpoint, the corpus) is: under $DSMOE_HOME if set, else beside the
    package (an editable install), else under the current directory (a checkout after a normal ``pip install .``).
    The first that exists; the package-relative path when none does (``require`` then names every place)."""
    return next((p for p in _places(relative) if p.exists()), ROOT / relative)


def _places(relative: str) -> list[pathlib.Path]:
    home = os.environ.get("DSMOE_HOME")
    return ([pathlib.Path(home) / relative] if home else []) + [ROOT / relative, pathlib.Path.cwd() / relative]


def require(path, what: str, relative: str) -> pathlib.Path:
    """``path`` if it exists, else a FileNotFoundError that says where the shipped copy was looked for."""
    path = pathlib.Path(path)
    if path.exists():
        return path
    looked = ", ".join(str(p) for p in _places(relative))
    raise FileNotFoundError(f"dualsparse: {what} not found at {path} (looked for the shipped copy in: {looked}). "
                            f"Run from a checkout of the repository, set DSMOE_HOME to it, or pass the path "
                            f"(--model / --data).")


MODEL_DIR, DATA_DIR = "models/dsmoe-tiny", "data/pydocs"
DEFAULT_MODEL = shipped(MODEL_DIR)
DEFAULT_DATA = shipped(DATA_DIR)
OFFSET = 3  # ByT5Tokenizer: token = byte + 3
SEQ = 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype``: the model's dtype; the checkpoint is stored in bf16, and the saved results are fp32."""
MC_CONTEXT, MC_CHOICE = 128, 32
SAMPLE_PROMPT = 256  # bytes of held-out text before the demo's generated continuation
METRICS = ("abs_gate", "gate", "gate_up", "abs_gate_up")
RATE_METHODS = ("1t", "2t-natural", "2t-random") + tuple(f"2t-{m}" for m in METRICS) + (
    "1t-per_layer", "2t-abs_gate-per_layer", "skip")
FIXED_METHODS = ("topk", "skip-median")
METHODS = ("none",) + RATE_METHODS + FIXED_METHODS


# ---- data and model ---------------------------------------------------------------------------------
def load_split(name: str, data_dir=DEFAULT_DATA) -> torch.Tensor:
    """Token ids of one corpus split ("train", "calib", "test")."""
    data = lzma.open(require(pathlib.Path(data_dir) / f"{name}.txt.xz", f"corpus split {name!r}",
                             f"{DATA_DIR}/{name}.txt.xz")).read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) + OFFSET


def windows(ids: torch.Tensor, n: int | None = None, seq: int = SEQ) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seq`` tokens (all of them for n=None)."""
    count = ids.numel() // seq if n is None else min(n, ids.numel() // seq)
    return ids[: count * seq].view(count, seq)


def load_model(path=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """The shipped checkpoint (bf16 on disk) in ``dtype`` (fp32 by default), eval mode."""
    import transformers as tf

    path = require(path, "model checkpoint", MODEL_DIR)
    return tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval().to(device)


def mc_items(ids: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences [n, 4, MC_CONTEXT + MC_CHOICE], answer [n]): see the module doc."""
    newline = ord("\n") + OFFSET
    starts = (ids[MC_CONTEXT:-MC_CHOICE] == newline).nonzero().flatten() + MC_CONTEXT + 1
    # a line start whose next MC_CHOICE bytes hold no further line break (a real line of text)
    ok = torch.tensor([not (ids[s:s + MC_CHOICE] == newline).any() for s in starts.tolist()], dtype=torch.bool)
    starts = starts[ok]
    g = torch.Generator().manual_seed(seed)
    seqs, answers = [], []
    for s in starts[torch.randperm(starts.numel(), generator=g)].tolist():
        if len(seqs) == n:
            break
        others = starts[torch.randint(0, starts.numel(), (3,), generator=g)].tolist()
        choices = [ids[s:s + MC_CHOICE]] + [ids[o:o + MC_CHOICE] for o in others]
        if len({tuple(c.tolist()) for c in choices}) < 4 or any(abs(o - s) < MC_CHOICE for o in others):
            continue
        answer = int(torch.randint(0, 4, (1,), generator=g))
        choices[0], choices[answer] = choices[answer], choices[0]
        context = ids[s - MC_CONTEXT:s]
        seqs.append(torch.stack([torch.cat([context, c]) for c in choices]))
        answers.append(answer)
    if len(seqs) < n:
        raise ValueError(f"only {len(seqs)} multiple-choice items could be built")
    return torch.stack(seqs), torch.tensor(answers)


# ---- settings ---------------------------------------------------------------------------------------
@dataclass
class Setting:
    method: str
    target: float | None
    """Requested compute drop rate (None: the method's own rate)."""
    options: dict = field(default_factory=dict)
    order: str | None = None
    """Neuron order of the plan: a metric name, "natural" or "random" (None: no plan)."""


def settings(drop_rates, methods=METHODS) -> list[Setting]:
    out = []
    if "none" in methods:
        out.append(Setting("none", 0.0))
    for rate in [r for r in drop_rates if r > 0]:
        for m in [m for m in RATE_METHODS if m in methods]:
            policy = "per_layer" if m.endswith("-per_layer") else "global"
            base = m.removesuffix("-per_layer")
            mode = base.split("-")[0]
            opts = {"drop": mode, "drop_rate": rate, "threshold_policy": policy}
            order = base.split("-", 1)[1] if mode == "2t" else "natural"
            if mode != "2t":
                opts["partition"] = 1  # 1T and skip drop whole experts: no halves needed
            out.append(Setting(m, rate, opts, order))
    if "topk" in methods:
        out.append(Setting("topk", None, {"drop": "topk"}))
    if "skip-median" in methods:
        out.append(Setting("skip-median", None, {"drop": "skip", "partition": 1}, "natural"))
    return out


def ordered_plan(plan, order: str, seed: int = 0):
    """``plan`` with neuron orders by a metric, or the checkpoint's ("natural") or a fixed random one."""
    from dsmoe_compiler.runtime.plan import Plan

    if order in METRICS:
        return plan.with_metric(order)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, lp in plan.layers.items():
        E, I = lp.metrics["abs_gate"].shape
        score = -torch.arange(I, dtype=torch.float32).expand(E, I) if order == "natural" else torch.rand(E, I, generator=g)
        layers[name] = dataclasses.replace(lp, metrics={**lp.metrics, "abs_gate": score.contiguous()}, order=None)
    return Plan(metric="abs_gate", layers=layers, architecture=plan.architecture, thresholds=dict(plan.thresholds))


def skip_median_beta(plan) -> float:
    """Lu et al.: beta = median over calibration pairs (all but each token's top) of score / top score."""
    ratios = []
    for lp in plan.layers.values():
        s = lp.scores.sort(dim=-1, descending=True).values
        ratios.append((s[:, 1:] / s[:, :1].clamp_min(1e-30)).flatten())
    return torch.cat(ratios).median().item()


# ---- running one setting ----------------------------------------------------------------------------
def _model_and_options(model_dir, setting: Setting, plan, *, inner: str, device, kernels: str, dtype):
    """A fresh copy of the model and the dualsparse options of ``setting`` (its plan ordered, its threshold)."""
    torch._dynamo.reset()
    model = load_model(model_dir, device, dtype)
    options = {"inner": inner, "kernels": kernels, "stats": True, **setting.options}
    if setting.order is not None:
        options["plan"] = ordered_plan(plan, setting.order)
    if setting.method == "skip-median":
        options["threshold"] = skip_median_beta(plan)
    return model, options


def as_text(ids: torch.Tensor) -> str:
    """Byte-level token ids back to text (special ids dropped, invalid UTF-8 replaced)."""
    data = bytes(int(i) - OFFSET for i in ids.flatten() if OFFSET <= int(i) < OFFSET + 256)
    return data.decode("utf-8", errors="replace")


@torch.no_grad()
def continuations(model_dir, chosen: list[Setting], plan, prompt: torch.Tensor, new: int, *, inner: str, device="cpu",
                  kernels: str = "auto", dtype=torch.float32) -> dict[str, str]:
    """Greedy continuations of ``prompt`` through ``generate``, the model's forward compiled with dualsparse for
    each setting; ``new`` bytes each."""
    texts = {}
    for setting in chosen:
        model, options = _model_and_options(model_dir, setting, plan, inner=inner, device=device, kernels=kernels,
                                            dtype=dtype)
        model.forward = torch.compile(model.forward, backend="dualsparse", options=options)
        out = model.generate(prompt[None].to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        texts[setting.method] = as_text(out[0, prompt.numel():])
    torch._dynamo.reset()
    return texts


def _forward_logits(compiled, x):
    return compiled(x).logits.float()


@torch.no_grad()
def run_setting(model_dir, setting: Setting, plan, lm: torch.Tensor, mc, *, inner: str, batch: int,
                progress: bool = True, device="cpu", kernels: str = "auto", dtype=torch.float32) -> dict:
    """Per-token NLL / correctness on ``lm`` windows, MC choices, and the measured drop rate."""
    import dsmoe_compiler
    from tqdm.auto import tqdm

    model, options = _model_and_options(model_dir, setting, plan, inner=inner, device=device, kernels=kernels,
                                        dtype=dtype)
    compiled = torch.compile(model, backend="dualsparse", options=options)
    nll, correct = [], []
    dsmoe_compiler.reset_drop_stats()
    t0 = time.perf_counter()
    for i in tqdm(range(0, lm.shape[0], batch), desc=f"{setting.method} @ {setting.target}", leave=False,
                  disable=not progress):
        x = lm[i:i + batch].to(device)
        logits = _forward_logits(compiled, x)[:, :-1]
        target = x[:, 1:]
        nll.append(-F.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0].cpu())
        correct.append((logits.argmax(-1) == target).cpu())
    seconds = time.perf_counter() - t0
    stats = dsmoe_compiler.drop_stats() if options.get("drop", "none") != "none" else {}
    measured = stats.get("overall", {}).get("drop_rate", 0.0)
    per_layer = {k: v["drop_rate"] for k, v in stats.items() if k != "overall"}
    mc_pick = None
    if mc is not None:
        seqs, _ = mc
        flat = seqs.flatten(0, 1)
        lls = []
        for i in range(0, flat.shape[0], batch * 4):
            x = flat[i:i + batch * 4].to(device)
            lp = F.log_softmax(_forward_logits(compiled, x)[:, MC_CONTEXT - 1:-1], -1)
            lls.append(lp.gather(-1, x[:, MC_CONTEXT:, None])[..., 0].sum(-1).cpu())
        mc_pick = torch.cat(lls).view(seqs.shape[0], 4).argmax(-1)
    return {"nll": torch.cat(nll), "correct": torch.cat(correct), "measured": measured, "per_layer": per_layer,
            "mc_pick": mc_pick, "seconds": seconds, "threshold": options.get("threshold")}


def summarise(setting: Setting, res: dict, base: dict | None, mc_answer) -> dict:
    nll, correct = res["nll"].double(), res["correct"].double()
    row = {"method": setting.method, "target_rate": setting.target, "measured_rate": res["measured"],
           "accuracy": correct.mean().item(), "perplexity": math.exp(nll.mean().item()), "loss": nll.mean().item(),
           "tokens": nll.numel()}
    if base is not None:
        # differences on the same tokens; standard error clustered by window (rows)
        d_acc = (correct - base["correct"].double()).mean(-1)
        d_loss = (nll - base["nll"].double()).mean(-1)
        n = d_acc.numel()
        row.update(d_accuracy=d_acc.mean().item(), d_accuracy_se=(d_acc.std() / math.sqrt(n)).item() if n > 1 else 0.0,
                   d_loss=d_loss.mean().item(), d_loss_se=(d_loss.std() / math.sqrt(n)).item() if n > 1 else 0.0)
    if res["mc_pick"] is not None:
        row["mc_accuracy"] = (res["mc_pick"] == mc_answer).double().mean().item()
        row["mc_items"] = int(mc_answer.numel())
    if res["threshold"] is not None:
        row["threshold"] = res["threshold"]
    row["per_layer_rate"] = res["per_layer"]
    return row


# ---- outputs ----------------------------------------------------------------------------------------
LABELS = {"none": "no drop", "1t": "1T", "2t-natural": "2T natural order", "2t-random": "2T random order",
          "2t-abs_gate": "2T recon. abs_gate", "2t-gate": "2T recon. gate", "2t-gate_up": "2T recon. gate_up",
          "2t-abs_gate_up": "2T recon. abs_gate_up", "1t-per_layer": "1T per-layer T",
          "2t-abs_gate-per_layer": "2T recon. abs_gate, per-layer T", "skip": "skip (Lu et al., beta fitted)",
          "topk": "static top-(k-1)", "skip-median": "skip (Lu et al., beta = median)"}


def format_table(rows: list[dict], seconds: bool = False) -> str:
    head = f"{'method':34s} {'target':>6s} {'measured':>8s} {'accuracy':>9s} {'Δacc (pts ± se)':>16s} " \
           f"{'ppl':>7s} {'Δloss (± se)':>18s}" + (f" {'MC acc':>7s}" if any("mc_accuracy" in r for r in rows) else "") \
           + (f" {'time s':>7s}" if seconds else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "own" if r["target_rate"] is None else f"{r['target_rate']:.0%}"
        d_acc = f"{100 * r['d_accuracy']:+.2f} ± {100 * r['d_accuracy_se']:.2f}" if "d_accuracy" in r else ""
        d_loss = f"{r['d_loss']:+.4f} ± {r['d_loss_se']:.4f}" if "d_loss" in r else ""
        line = f"{LABELS.get(r['method'], r['method']):34s} {target:>6s} {r['measured_rate']:8.2%} " \
               f"{r['accuracy']:9.2%} {d_acc:>16s} {r['perplexity']:7.4f} {d_loss:>18s}"
        if "mc_accuracy" in r:
            line += f" {r['mc_accuracy']:7.1%}"
        if seconds:
            line += f" {r['seconds']:7.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    base = next((r for r in rows if r["method"] == "none"), None)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for i, m in enumerate(methods):
        pts = sorted([r for r in rows if r["method"] == m] + ([base] if base and m in RATE_METHODS else []),
                     key=lambda r: r["measured_rate"])
        x = [100 * r["measured_rate"] for r in pts]
        style = dict(marker="os^vD<>p*hXP"[i % 12], label=LABELS.get(m, m),
                     linestyle="--" if "per_layer" in m else "-", linewidth=1.2, markersize=6)
        if m in FIXED_METHODS or m == "none":
            style.update(linestyle="none", markersize=9)
        axes[0].plot(x, [100 * r["accuracy"] for r in pts], **style)
        axes[1].plot(x, [r["perplexity"] for r in pts], **style)
    axes[0].set_ylabel("held-out next-byte accuracy (%)")
    axes[1].set_ylabel("held-out perplexity (bytes)")
    for ax in axes:
        ax.set_xlabel("measured compute drop rate (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry points -----------------------------------------------------------------------------------
def calibrate_plan(model_dir, data_dir, calib_windows: int, batch: int, progress: bool, device="cpu",
                   dtype=torch.float32):
    import dsmoe_compiler

    model = load_model(model_dir, device, dtype)
    calib = windows(load_split("calib", data_dir), calib_windows)
    return dsmoe_compiler.calibrate(model, list(calib.split(batch)), metric="abs_gate", progress=progress)


def evaluate(model_dir=DEFAULT_MODEL, data_dir=DEFAULT_DATA, drop_rates=(0.0, 0.1, 0.25, 0.4), methods=METHODS, *,
             lm_windows: int = 192, mc_items_n: int = 200, calib_windows: int = 64, inner: str = "eager",
             batch: int = 8, progress: bool = True, plan=None, device="cpu", kernels: str = "auto",
             dtype=torch.float32, on_row=None) -> list[dict]:
    """Rows (dicts) of every setting; the first is the no-drop reference. ``on_row(rows)`` after each."""
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    if plan is None:
        plan = calibrate_plan(model_dir, data_dir, calib_windows, batch, progress, device, dtype)
    test = load_split("test", data_dir)
    lm = windows(test, lm_windows)
    mc = mc_items(test, mc_items_n) if mc_items_n else None
    todo = settings(drop_rates, ("none",) + tuple(m for m in methods if m != "none"))
    rows, base = [], None
    for setting in tqdm(todo, desc="dualsparse eval", disable=not progress):
        res = run_setting(model_dir, setting, plan, lm, mc, inner=inner, batch=batch, progress=progress,
                          device=device, kernels=kernels, dtype=dtype)
        row = summarise(setting, res, base, None if mc is None else mc[1])
        row["seconds"] = res["seconds"]
        if base is None:
            base = res
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    torch._dynamo.reset()
    return rows


def write_outputs(rows: list[dict], out_dir, title: str, meta: dict) -> None:
    import csv

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = [k for k in ("method", "target_rate", "measured_rate", "accuracy", "d_accuracy", "d_accuracy_se",
                        "perplexity", "loss", "d_loss", "d_loss_se", "mc_accuracy", "mc_items", "threshold", "tokens")]
    with open(out / "eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "eval.png", title)


def main_eval(args) -> None:
    rates = [float(r) for r in args.drop_rates.split(",")]
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    torch.set_num_threads(args.threads) if args.threads else None
    meta = {"model": str(args.model), "data": str(args.data), "lm_windows": args.windows, "seq": SEQ,
            "mc_items": args.mc_items, "calib_windows": args.calib_windows, "inner": args.inner,
            "kernels": args.kernels, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
            "command": "python -m dsmoe_compiler " + " ".join(sys.argv[1:])}

    def write(rows):  # after every setting: a run stopped early keeps what it measured
        title = f"{pathlib.Path(args.model).name}: {rows[0]['tokens']:,} held-out bytes ({args.device}, {args.dtype})"
        write_outputs(rows, args.out, title, meta)

    rows = evaluate(args.model, args.data, rates, methods, lm_windows=args.windows, mc_items_n=args.mc_items,
                    calib_windows=args.calib_windows, inner=args.inner, batch=args.batch, device=args.device,
                    kernels=args.kernels, dtype=DTYPES[args.dtype], on_row=write)
    print(format_table(rows))
    print(f"\nwrote {args.out}/eval.csv, eval.json, eval.png")


def main_demo(args) -> None:
    """Shipped model, calibration, dualsparse at 0 % and 25 % drop: table and plot, CPU, a few minutes."""
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads) if args.threads else None
    methods = ("none", "1t", "2t-natural", "2t-abs_gate", "topk")
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    plan = calibrate_plan(args.model, args.data, args.calib_windows, args.batch, True, args.device, dtype)
    rows = evaluate(args.model, args.data, (0.0, 0.25), methods, lm_windows=args.windows, mc_items_n=0,
                    calib_windows=args.calib_windows, inner=args.inner, batch=args.batch, device=args.device,
                    kernels=args.kernels, dtype=dtype, plan=plan)
    print(f"\n{pathlib.Path(args.model).name}: byte-level Qwen3-MoE, {rows[0]['tokens']:,} held-out bytes of the "
          f"Python docs; dualsparse, inner={args.inner}; 'time s' = wall time of the pass, its first call (compile) "
          "included\n")
    print(format_table(rows, seconds=True))
    out = pathlib.Path(args.out)
    meta = {"model": str(args.model), "lm_windows": args.windows, "inner": args.inner, "torch": torch.__version__,
            "command": "python -m dsmoe_compiler " + " ".join(sys.argv[1:])}
    write_outputs(rows, out, f"demo: {pathlib.Path(args.model).name}, {rows[0]['tokens']:,} held-out bytes", meta)
    by = {r["method"]: r for r in rows}
    if "2t-abs_gate" in by and "1t" in by:
        a, b = by["2t-abs_gate"], by["1t"]
        print(f"\nat ~25 %: 2T with reconstruction vs 1T: accuracy {100 * (a['accuracy'] - b['accuracy']):+.2f} points, "
              f"loss {a['loss'] - b['loss']:+.4f} (measured rates {a['measured_rate']:.1%} / {b['measured_rate']:.1%})")
    if args.sample:
        print_continuations(args, plan)
    print(f"plot: {out / 'eval.png'}; total {time.perf_counter() - t_start:.0f} s")


def print_continuations(args, plan) -> None:
    """The same held-out prompt continued without dropping and with 2T (reconstruction) at 25 %."""
    test = load_split("test", args.data)
    start = test.numel() // 2
    prompt = test[start:start + SAMPLE_PROMPT]
    chosen = settings((0.25,), ("none", "2t-abs_gate"))
    texts = continuations(args.model, chosen, plan, prompt, args.sample, inner=args.inner, device=args.device,
                          kernels=args.kernels, dtype=DTYPES[args.dtype])
    print(f"\ngenerate() through dualsparse, greedy, {args.sample} bytes after a held-out prompt:")
    print("  prompt: " + repr(as_text(prompt)[-120:]))
    for setting in chosen:
        print(f"  {LABELS.get(setting.method, setting.method):>20}: {texts[setting.method]!r}")


def add_arguments(p, demo: bool = False) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the shipped model)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="corpus directory with calib/test splits")
    p.add_argument("--windows", type=int, default=48 if demo else 64, help=f"held-out windows of {SEQ} bytes")
    p.add_argument("--calib-windows", type=int, default=16 if demo else 64, help="calibration windows (calib split)")
    p.add_argument("--inner", default="eager", choices=["eager", "aot_eager", "inductor"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"], help="dualsparse kernels")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's dtype (the checkpoint is bf16)")
    p.add_argument("--out", default="results/demo" if demo else "results/eval")
    if demo:
        p.add_argument("--sample", type=int, default=64,
                       help="bytes to generate after a held-out prompt, without and with 2T at 25 %% (0: none)")
    if not demo:
        p.add_argument("--drop-rates", default="0,0.1,0.25,0.4")
        p.add_argument("--methods", default="all", help=f"comma-separated subset of {','.join(METHODS)}")
        p.add_argument("--mc-items", type=int, default=64, help="multiple-choice items (0: none)")
