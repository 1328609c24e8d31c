"""Capture survey: which of the installed transformers' MoE architectures the dualsparse backend captures,
and whether the compiled model still gives the eager answer (CPU, fp32, tiny random models).

Usage::

    python benchmarks/capture_survey.py                       # every MoE architecture, all experts impls
    python benchmarks/capture_survey.py --arch mixtral,olmoe  # a subset (folder names under transformers/models)
    python benchmarks/capture_survey.py --impls grouped_mm,eager --jobs 2 --timeout 120
    python benchmarks/capture_survey.py --list                # only print the discovered architectures
    python benchmarks/capture_survey.py --dynamic --out results/capture_survey_dynamic.json  # dynamic=True

What it does, per architecture:

- discovery: the model folders under ``transformers/models`` whose modeling file uses
  ``use_experts_implementation`` or defines an ``...Experts(nn.Module)`` / sparse-MoE block; the config
  type used is the one with an ``AutoModelForCausalLM`` mapping (a ``*_text`` type preferred); folders
  without one (multimodal / encoder-decoder / vision only) are listed as skipped;
- a tiny config: generic overrides of whatever size/expert/top-k/"every layer is MoE" attributes the
  config has (``GENERIC``, per-layer lists cut to 2 layers), then ``PER_ARCH`` fixes; random
  non-degenerate weights as in ``tests/models.hf_model`` (fp32, seed 0);
- for each experts implementation (``grouped_mm``, ``batched_mm``, ``eager``) when the model class
  supports ``_experts_implementation``, else once with the model's default: eager logits on random
  ``[2, 12]`` input ids, then ``torch._dynamo.reset()`` and
  ``torch.compile(model, backend="dualsparse", options={"inner": "eager"})`` logits;
- records: build ok, MoE blocks in the model (parents of experts modules: 3-D expert weights or a
  ModuleList of experts), blocks the backend rewrote (``dsmoe_compiler.last_report()``), blocks it left
  alone and why, max abs / relative error vs eager, dualsparse warnings / log lines, graphs and graph-break
  reasons, exceptions (type + first line).

With ``--backward`` (grad mode on, ``inner="aot_eager"``, so that AOT autograd traces a backward) the row also
compares every parameter's gradient of a fixed random projection of the logits with eager's (``grad_rel_err``,
the worst relative error over parameters, each against at least a millionth of the largest gradient's norm, and the
parameters whose gradient went missing).

With ``--dynamic`` the compile is ``torch.compile(..., dynamic=True)``, run on two lengths ([2, 12] then [2, 7]),
each compared with eager; the same model under ``backend="eager"`` gives the graphs and breaks that the model has
without us, and a row with more graphs than that says so.

Each architecture runs in its own subprocess (``--worker``) with a ``signal.alarm`` guard per case, so a
crash or a hang costs one row. Results: ``results/capture_survey.json`` and ``results/capture_survey.md``;
the markdown table is printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from models import randomize_  # noqa: E402  (the tests' random weights)

IMPLS = ("grouped_mm", "batched_mm", "eager")
E, K, VOCAB, LAYERS = 8, 2, 96, 2
_DROP = object()  # PER_ARCH value: do not pass this attribute
WRONG = 1e-4  # fp32 relative error above which the compiled answer is not eager's

# ---- tiny configs ---------------------------------------------------------------------------------
# attribute -> value, applied to whatever of these the default config has (None-valued defaults kept None
# for the optional ones listed in KEEP_NONE: e.g. q_lora_rank=None means "no q LoRA").
GENERIC = {
    # sizes
    "hidden_size": 32, "d_model": 32, "intermediate_size": 64, "ffn_hidden_size": 64, "intermediate_size_mlp": 64,
    "dense_intermediate_size": 64, "prefix_dense_intermediate_size": 64,
    "moe_intermediate_size": 24, "expert_ffn_hidden_size": 24, "shared_expert_intermediate_size": 24,
    "shared_intermediate_size": 24, "moe_shared_expert_intermediate_size": 24, "shared_experts_intermediate_size": 24,
    "num_hidden_layers": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2, "head_dim": 8, "swa_head_dim": 8,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "o_lora_rank": 16, "o_groups": 2,
    "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4, "index_topk_blocks": 2,
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
    "linear_head_dim": 8, "linear_num_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_head": 8, "mamba_head_dim": 8, "mamba_dt_rank": 8,
    "mamba_n_groups": 1, "n_groups": 1, "mamba_d_state": 8, "ssm_state_size": 8, "mamba_d_state_size": 8,
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "router_hidden_size": 16,
    "gated_norm_rank": 8, "hc_lowrank": 8, "loop_gate_rank": 8, "rotary_dim": 8, "ple_embed_dim": 32,
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "max_position_embeddings": 128,
    "sliding_window": 16, "sliding_window_size": 16, "keep_window_size": 16,
    # experts and top-k
    "num_experts": E, "num_local_experts": E, "n_routed_experts": E, "moe_num_experts": E,
    "num_experts_per_tok": K, "moe_topk": K, "moe_k": K, "num_experts_per_token": K, "top_k_experts": K,
    # every layer MoE
    "first_k_dense_replace": 0, "num_dense_layers": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "moe_layer_freq": 1, "moe_layer_start_index": 0, "moe_layer_end_index": LAYERS - 1, "moe_layer_interval": 1,
    "expert_layer_period": 1, "expert_layer_offset": 0, "interleave_moe_layer_step": 1, "is_moe": True,
    "enable_moe_block": True, "moe_layers": list(range(LAYERS)),
    # misc
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
}
KEEP_NONE = {"q_lora_rank", "sliding_window", "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim",
             "prefix_dense_intermediate_size", "index_topk", "num_nextn_predict_layers", "mamba_dt_rank"}
FILL_NONE = {"n_shared_experts": 1}  # None breaks some modeling code (Dots1: moe_intermediate_size * n_shared_experts)
SHARED_OFF_WHEN_ZERO = {"shared_intermediate_size"}  # 0 means "no shared experts": turn them on (24)
GROUP_KEYS = (("n_group", "topk_group"), ("num_expert_group", "topk_group"))
LAYER_LIST_KEYS = ("layer_types", "layers_block_type")
MLP_LIST_KEYS = ("mlp_layer_types",)

# per-architecture fixes on top of GENERIC (folder name -> overrides)
PER_ARCH: dict[str, dict] = {
    "dbrx": {"d_model": 32, "n_heads": 4, "n_layers": LAYERS, "max_seq_len": 128, "vocab_size": VOCAB,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": E, "moe_top_k": K}},
    "doge": {"num_experts": 16, "is_moe": True},  # product-key experts: E must be a square
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 8,  # mamba_expand * hidden = heads * d_head
                         "layer_types": ["linear_attention", "full_attention"]},
    "mistral4": {"head_dim": 16},  # rope dim = head_dim * partial_rotary_factor (0.5) = qk_rope_head_dim
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "longcat_flash": {"zero_expert_num": 4},  # identity ("zero") experts next to the 8 routed ones
    "nemotron_h": {"layers_block_type": ["full_attention", "moe"], "num_hidden_layers": _DROP},
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                  "indexer_compress_ratio": 2},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
}


def _first_distinct(values, n):
    """Indices of up to n entries, the first of each distinct value first (so both layer kinds appear)."""
    picked, seen = [], set()
    for i, v in enumerate(values):
        key = json.dumps(v, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            picked.append(i)
    for i in range(len(values)):
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    return sorted(picked[:n])


def _sparse_value(values):
    for v in values:
        if isinstance(v, str) and any(s in v.lower() for s in ("sparse", "moe", "expert")):
            return v
    return None


def tiny_config(arch: str, model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    d = default.to_dict()
    n0 = next((d[k] for k in ("num_hidden_layers", "n_layers", "num_layers") if isinstance(d.get(k), int)), None)
    kw = {}
    for key, value in GENERIC.items():
        if key not in d:
            continue
        if d[key] is None and key in KEEP_NONE:
            continue
        if key in SHARED_OFF_WHEN_ZERO or d[key] != value or key in ("num_hidden_layers",):
            kw[key] = value
    for key, value in FILL_NONE.items():
        if key in d and d[key] is None:
            kw[key] = value
    if "kv_lora_rank" in d and "num_attention_heads" in kw:  # multi-head latent attention: as many kv heads as heads
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    for gkey, tkey in GROUP_KEYS:
        if gkey in d and isinstance(d[gkey], int) and d[gkey] > 1:
            kw[gkey], kw[tkey] = 4, 2
        elif gkey in d and d[gkey] is not None:
            kw[gkey] = 1
            if tkey in d:
                kw[tkey] = 1
    # per-layer lists: keep 2 layers, both kinds where there are two; MLP lists all sparse
    picked = list(range(LAYERS))
    for key in LAYER_LIST_KEYS:
        if isinstance(d.get(key), list) and len(d[key]) >= LAYERS:
            picked = _first_distinct(d[key], LAYERS)
            kw[key] = [d[key][i] for i in picked]
            break
    for key, value in d.items():
        if key in kw or key.startswith("_") or not isinstance(value, list) or n0 is None or len(value) != n0:
            continue
        if key in MLP_LIST_KEYS:
            sparse = _sparse_value(value)
            kw[key] = [sparse or value[i] for i in picked]
        else:
            kw[key] = [value[i] for i in picked]
    kw.update(PER_ARCH.get(arch, {}))
    kw = {k: v for k, v in kw.items() if v is not _DROP}
    return cls(**kw), kw


# ---- models ---------------------------------------------------------------------------------------
def build_model(arch: str, model_type: str, impl: str | None, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model_type, _, direct = model_type.partition("@")
    config, overrides = tiny_config(arch, model_type)
    if impl is not None:
        config._experts_implementation = impl
    if direct:  # a text CausalLM class missing from the AutoModelForCausalLM mapping
        model = _causal_class(model_type, direct)(config).float().eval()
    else:
        model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    return randomize_(model), overrides


def _causal_class(model_type: str, cls_name: str | None = None):
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mod = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
    return getattr(mod, cls_name or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def supports_impl(model_type: str) -> bool:
    model_type, _, direct = model_type.partition("@")
    return _causal_class(model_type, direct or None)._can_set_experts_implementation()


def moe_blocks(model) -> list[str]:
    """Module paths of the MoE blocks: parents of experts modules (3-D weights with a leading expert dim, or a
    ModuleList named experts)."""
    import torch.nn as nn

    blocks = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        # 3-D expert weights (gate_up_proj, down_proj, w1, ...); not any 3-D tensor (Inkling-2-Loop's attention query)
        own = [p for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and ("proj" in n or n[:1] == "w")]
        is_experts = ((bool(own) and not isinstance(module, nn.modules.conv._ConvNd)) or cls.endswith("Experts")
                      or (isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "experts"))
        is_experts = is_experts and "Shared" not in cls
        if is_experts and name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent not in blocks:
                blocks.append(parent)
        elif name and _MOE_CLASS.search(cls) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)  # an MoE block class without 3-D weights (e.g. Doge's product-key embeddings)
    return [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]


_MOE_CLASS = re.compile(r"(MoE|Moe)(Block|Layer)?$|SparseMoe")


# ---- one case -------------------------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("timed out")


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _where(error: BaseException) -> str:
    """Innermost frame in dsmoe_compiler or transformers (file:line), to locate the failure."""
    frames = traceback.extract_tb(error.__traceback__)
    for f in reversed(frames):
        if "dsmoe_compiler" in f.filename or "/passes/" in f.filename or "/codegen/" in f.filename or "/runtime/" in f.filename:
            return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}"
    for f in reversed(frames):
        if "transformers" in f.filename:
            return f"transformers/{f.filename.split('transformers/', 1)[-1]}:{f.lineno}"
    return ""


def _graphs_and_breaks(counters) -> tuple[int, dict]:
    # torch 2.13 counts most breaks under "unimplemented" (first line of the reason), older ones under "graph_break"
    return counters["stats"]["unique_graphs"], {str(k).splitlines()[0][:160]: v for kind in ("graph_break", "unimplemented")
                                                for k, v in counters[kind].items()}


def _lengths(dynamic: bool) -> tuple[int, ...]:
    return (12, 7) if dynamic else (12,)


def _probe_loss(model, ids, probe):
    """A fixed random projection of the logits (every logit gets a gradient), and the parameters' gradients."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits.float()
    (logits * probe).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _gradients_against_eager(model, compiled, ids) -> dict:
    import torch

    probe = torch.randn(model(ids).logits.shape, generator=torch.Generator().manual_seed(2))
    _, want = _probe_loss(model, ids, probe)
    got_logits, got = _probe_loss(compiled, ids, probe)
    got = {n.removeprefix("_orig_mod."): g for n, g in got.items()}
    # a gradient that is zero up to rounding (DeepSeek-V4's hash layer with one expert id twice: constant weights)
    # is measured against a millionth of the largest one, not against its own rounding noise
    floor = 1e-6 * max((g.norm().item() for g in want.values()), default=0.0)
    errors = [((got[n] - g).norm() / max(g.norm().item(), floor, 1e-30)).item() for n, g in want.items() if n in got]
    if any(not torch.isfinite(g).all() for g in got.values()):
        errors.append(float("inf"))
    return {"grad_rel_err": max(errors, default=None), "missing_grads": sorted(n for n in want if n not in got)[:6],
            "logits": got_logits}


def _aot_eager_error(arch: str, model_type: str, impl: str | None) -> str | None:
    """The same gradients under torch's own ``backend="aot_eager"``: its error, if it fails too (not ours)."""
    import torch

    torch._dynamo.reset()
    model, _ = build_model(arch, model_type, impl)
    ids = torch.randint(3, VOCAB, (2, _lengths(False)[0]), generator=torch.Generator().manual_seed(1))
    try:
        _probe_loss(torch.compile(model, backend="aot_eager"), ids, torch.randn(model(ids).logits.shape))
    except Exception as error:  # noqa: BLE001
        return _first_line(error)
    return None


def run_case(arch: str, model_type: str, impl: str | None, timeout: int, dynamic: bool = False,
             backward: bool = False) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import dsmoe_compiler

    row = {"arch": arch, "model_type": model_type, "impl": impl or "default", "build": False, "blocks": None,
           "captured": None, "left_alone": [], "variants": [], "rel_err": None, "max_abs": None,
           "warnings": [], "graph_breaks": {}, "graphs": None, "error": None, "where": None, "seconds": None}
    start = time.time()
    handler = _LogCapture()
    logging.getLogger("dsmoe_compiler").addHandler(handler)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    stage = "build"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, overrides = build_model(arch, model_type, impl)
            row["build"], row["overrides"] = True, {k: v for k, v in overrides.items() if k in PER_ARCH.get(arch, {})}
            blocks = moe_blocks(model)
            row["blocks"], row["block_names"] = len(blocks), blocks[:4]
            inputs = [torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(1)) for n in _lengths(dynamic)]
            inputs = inputs[:1] if backward else inputs  # gradients at the first length
            stage = "eager"
            with torch.no_grad():
                expected = torch.cat([model(ids).logits.float().flatten() for ids in inputs])
            if dynamic:
                stage = "baseline"
                torch._dynamo.reset()
                counters.clear()
                baseline = torch.compile(model, backend="eager", dynamic=True)
                with torch.no_grad():
                    for ids in inputs:
                        baseline(ids)
                row["baseline_graphs"], row["baseline_breaks"] = _graphs_and_breaks(counters)
            stage = "compile"
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(model, backend="dualsparse", options={"inner": "aot_eager" if backward else "eager"},
                                     dynamic=dynamic or None)
            if backward:
                grads = _gradients_against_eager(model, compiled, inputs[0])
                got = grads.pop("logits").flatten()
                row.update(grads)
            else:
                with torch.no_grad():
                    got = torch.cat([compiled(ids).logits.float().flatten() for ids in inputs])
            report = dsmoe_compiler.last_report()
            # one entry per rewritten block; names alone can repeat (a graph that starts inside a decoder layer names
            # its block from that layer: "mlp")
            row["captured"] = len(report.rewritten)
            row["variants"] = sorted({f"{b.form}/{b.variant}" for b in report.rewritten})
            row["left_alone"] = sorted({f"{b.name}: {b.reason}" for b in report.left_alone})
            row["graphs"] = report.graphs
            row["graph_breaks"] = _graphs_and_breaks(counters)[1]
            diff = (got - expected).abs().max().item()
            row["max_abs"] = diff
            row["rel_err"] = diff / max(expected.abs().max().item(), 1e-30)
            if not torch.isfinite(got).all():
                row["rel_err"] = float("inf") if torch.isfinite(expected).all() else row["rel_err"]
        row["warnings"] = sorted({str(w.message)[:300] for w in caught
                                  if "dualsparse" in str(w.message) or "dsmoe" in str(w.filename)})
    except BaseException as error:  # noqa: BLE001 (a survey row, whatever happened)
        if isinstance(error, KeyboardInterrupt):
            raise
        row["error"] = f"[{stage}] {_first_line(error)}"
        row["where"] = _where(error)
        try:
            report = dsmoe_compiler.last_report()
            row["left_alone"] = sorted({f"{b.name}: {b.reason}" for b in report.left_alone})
        except Exception:  # noqa: BLE001
            pass
        if backward and stage == "compile":
            row["baseline_error"] = _aot_eager_error(arch, model_type, impl)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        logging.getLogger("dsmoe_compiler").removeHandler(handler)
        torch._dynamo.reset()
    row["warnings"] = sorted(set(row["warnings"]) | {l[:300] for l in handler.lines})
    row["seconds"] = round(time.time() - start, 1)
    return row


# ---- discovery ------------------------------------------------------------------------------------
_MOE_SOURCE = re.compile(r"use_experts_implementation|^class \w*Experts\(nn\.Module\)|SparseMoe\w*Block|"
                         r"^class \w*(MoE|Moe)\w*\(nn\.Module\)", re.MULTILINE)


def discover() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(folder, model_type) to survey], [(folder, why skipped)])."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    keep, skipped = [], []
    for folder in sorted(os.listdir(root)):
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        source = "".join(open(os.path.join(path, f)).read() for f in sorted(os.listdir(path))
                         if f.startswith("modeling_") and f.endswith(".py"))
        if not _MOE_SOURCE.search(source):
            continue
        types = [t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) == folder]
        causal = [t for t in types if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
        if not causal:
            direct = sorted(set(re.findall(r"^class (\w+ForCausalLM)\(", source, re.MULTILINE)))
            if len(types) == 1 and len(direct) == 1:  # text-only model whose CausalLM class is not in the auto mapping
                keep.append((folder, f"{types[0]}@{direct[0]}"))
            else:
                skipped.append((folder, "no text CausalLM mapping (" + ", ".join(types) + ")"))
            continue
        text = [t for t in causal if t.endswith("_text")]
        keep.append((folder, (text or [t for t in causal if t == folder] or causal)[0]))
    return keep, skipped


# ---- driver ---------------------------------------------------------------------------------------
def worker(arch: str, model_type: str, impls: list[str], timeout: int, dynamic: bool, backward: bool) -> list[dict]:
    import torch

    torch.set_num_threads(int(os.environ.get("SURVEY_THREADS", "1")))
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        can_set = supports_impl(model_type)
    except Exception as error:  # noqa: BLE001
        return [{"arch": arch, "model_type": model_type, "impl": "default", "build": False,
                 "error": f"[import] {_first_line(error)}", "where": _where(error)}]
    return [run_case(arch, model_type, impl, timeout, dynamic, backward) for impl in (impls if can_set else [None])]


def _run_worker(arch, model_type, impls, timeout, dynamic, backward) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arch, "--model-type", model_type,
           "--impls", ",".join(impls), "--timeout", str(timeout)] + (["--dynamic"] if dynamic else []) + (
        ["--backward"] if backward else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * (len(impls) + 1) + 60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [{"arch": arch, "model_type": model_type, "impl": "*", "build": None, "error": "worker timed out"}]
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("SURVEY_JSON "):
            return json.loads(line[len("SURVEY_JSON "):])
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
    return [{"arch": arch, "model_type": model_type, "impl": "*", "build": None,
             "error": f"worker exited {out.returncode}: {tail[0][:300]}"}]


def note(row: dict) -> str:
    if row.get("error"):
        same = row.get("baseline_error") == row["error"].split("] ", 1)[-1]
        return f"ERROR {row['error']}" + (f" @ {row['where']}" if row.get("where") else "") + (
            " (backend=\"aot_eager\" alone fails the same way)" if same else "")
    parts = []
    rel, blocks, captured = row.get("rel_err"), row.get("blocks"), row.get("captured")
    if rel is not None and rel > WRONG:
        silent = not row.get("warnings") and not row.get("left_alone")
        parts.append("**WRONG ANSWER (silent)**" if silent else "WRONG ANSWER (warned)")
    if blocks == 0:
        parts.append("no MoE block found in tiny model")
    elif captured is not None and blocks is not None and captured < blocks and not row.get("left_alone"):
        parts.append("not captured, no warning")
    if row.get("left_alone"):
        reasons = sorted({r.split(": ", 1)[-1] for r in row["left_alone"]})
        parts.append("left alone: " + "; ".join(reasons))
    if row.get("graph_breaks") or (row.get("graphs") or 1) > 1:
        parts.append(f"{row.get('graphs')} graphs, breaks: " + "; ".join(sorted(row.get("graph_breaks") or {})))
    if row.get("baseline_graphs") is not None and (row.get("graphs") or 0) > row["baseline_graphs"]:
        parts.append(f"**more graphs than backend=eager ({row['baseline_graphs']})**")
    if row.get("missing_grads"):
        parts.append("**MISSING GRADIENTS** " + ",".join(row["missing_grads"]))
    if row.get("grad_rel_err") is not None and row["grad_rel_err"] > WRONG:
        parts.append(f"**WRONG GRADIENTS** ({row['grad_rel_err']:.1e})")
    if row.get("variants"):
        parts.append(",".join(row["variants"]))
    return "; ".join(parts)


def markdown(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.1e}" if isinstance(v, float) else str(v))

    grads = any("grad_rel_err" in r for r in rows)
    lines = ["| arch | impl | blocks | captured | rel err |" + (" grad rel err |" if grads else "") + " note |",
             "|---|---|---|---|---|" + ("---|" if grads else "") + "---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r.get('impl')} | {fmt(r.get('blocks'))} | {fmt(r.get('captured'))} | "
                     f"{fmt(r.get('rel_err'))} |" + (f" {fmt(r.get('grad_rel_err'))} |" if grads else "")
                     + f" {note(r).replace('|', '/')} |")
    if skipped:
        lines += ["", "Skipped (no text CausalLM mapping): " + ", ".join(f"{f}" for f, _ in skipped)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="", help="comma-separated folder names (default: all discovered)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--timeout", type=int, default=120, help="seconds per (arch, impl) case")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "capture_survey.json"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--dynamic", action="store_true", help="compile with dynamic=True, two lengths")
    ap.add_argument("--backward", action="store_true", help="grad mode, inner=aot_eager: gradients against eager's")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-type", help=argparse.SUPPRESS)
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]

    if args.worker:
        rows = worker(args.worker, args.model_type, impls, args.timeout, args.dynamic, args.backward)
        print("SURVEY_JSON " + json.dumps(rows, default=str))
        return

    keep, skipped = discover()
    if args.arch:
        wanted = set(args.arch.split(","))
        keep = [(a, t) for a, t in keep if a in wanted]
    if args.list:
        for a, t in keep:
            print(f"{a:24s} {t}")
        for a, why in skipped:
            print(f"{a:24s} SKIPPED: {why}")
        return
    start = time.time()
    results: dict[str, list[dict]] = {}
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_run_worker, a, t, impls, args.timeout, args.dynamic, args.backward): a for a, t in keep}
        for fut in cf.as_completed(futures):
            arch = futures[fut]
            results[arch] = fut.result()
            for r in results[arch]:
                print(f"[{time.time() - start:6.0f}s] {arch:20s} {r.get('impl')!s:10s} blocks={r.get('blocks')} "
                      f"captured={r.get('captured')} rel={r.get('rel_err')} {note(r)[:200]}", flush=True)
    rows = [r for a, _ in keep for r in results[a]]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    import torch
    import transformers

    payload = {"torch": torch.__version__, "transformers": transformers.__version__, "seconds": round(time.time() - start),
               "impls": impls, "dynamic": args.dynamic, "backward": args.backward, "rows": rows, "skipped": [{"arch": a, "reason": w} for a, w in skipped]}
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    table = markdown(rows, skipped)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"# dualsparse capture survey (torch {torch.__version__}, transformers {transformers.__version__}, "
                f"CPU fp32, inner={'aot_eager, gradients' if args.backward else 'eager'}"
                f"{', dynamic=True' if args.dynamic else ''})\n\n{table}\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
