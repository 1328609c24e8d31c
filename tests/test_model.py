"""The shipped MoE (models/dsmoe-tiny), its corpus split, and the evaluation CLI on a tiny slice."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsmoe_compiler import evaluate as ev

MODEL = ev.DEFAULT_MODEL
RECORDED = json.loads((MODEL / "metrics.json").read_text())

# The recorded perplexity was computed by training/train.py on the GPU (torch 2.11, CUDA, fp32 with
# TF32 off) from the same bf16 weights on the same 32 test windows; here it is recomputed on CPU in fp32.
# Only the summation order differs (and, rarely, a router top-k choice between near-equal scores), which
# moves the mean NLL by ~1e-5 relative; a wrong checkpoint, corpus split or tokenizer offset moves it
# by whole percent. Measured: CPU (torch 2.13) 2.097747 vs recorded 2.097660, 4.1e-5 relative, identical accuracy;
# 1e-3 relative on perplexity leaves a 25x margin and still separates the two.
PPL_RTOL = 1e-3


def test_checkpoint_files_fit_the_limits():
    sizes = {p.name: p.stat().st_size for p in MODEL.iterdir()}
    assert max(sizes.values()) <= 16 * 2**20, sizes
    assert sum(sizes.values()) <= 30 * 2**20, sizes


def test_shipped_checkpoint_loads_and_matches_its_recorded_perplexity():
    import transformers as tf

    model = ev.load_model(MODEL)
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 4
    assert cfg.num_hidden_layers >= 4
    tok = tf.AutoTokenizer.from_pretrained(str(MODEL))
    text = "def f(x):\n    return x  # é"
    assert tok(text, add_special_tokens=False).input_ids == [b + ev.OFFSET for b in text.encode()]

    recorded = RECORDED["test_first_windows"]
    ids = ev.windows(ev.load_split("test"), recorded["windows"])
    nll, correct = 0.0, 0
    with torch.no_grad():
        for x in ids.split(8):
            logits = model(x).logits[:, :-1].float()
            nll -= F.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).sum().item()
            correct += (logits.argmax(-1) == x[:, 1:]).sum().item()
    n = ids.shape[0] * (ids.shape[1] - 1)
    assert n == recorded["tokens"]
    assert math.exp(nll / n) == pytest.approx(recorded["perplexity"], rel=PPL_RTOL)
    assert correct / n == pytest.approx(recorded["accuracy"], abs=2e-3)  # a few flipped argmaxes of 16k at most


def test_multiple_choice_items_are_well_formed():
    test = ev.load_split("test")
    seqs, answers = ev.mc_items(test, 20, seed=3)
    assert seqs.shape == (20, 4, ev.MC_CONTEXT + ev.MC_CHOICE)
    text = bytes((test - ev.OFFSET).tolist())
    for item, answer in zip(seqs, answers):
        choices = {bytes((c[ev.MC_CONTEXT:] - ev.OFFSET).tolist()) for c in item}
        assert len(choices) == 4  # distinct
        assert all(torch.equal(c[:ev.MC_CONTEXT], item[0][:ev.MC_CONTEXT]) for c in item)  # one shared context
        true = bytes((item[answer] - ev.OFFSET).tolist())
        assert true in text and true[ev.MC_CONTEXT - 1:ev.MC_CONTEXT] == b"\n"  # real text; answer starts a line


def test_eval_cli_on_a_tiny_slice(tmp_path):
    from dsmoe_compiler.__main__ import main

    main(["eval", "--windows", "2", "--calib-windows", "2", "--mc-items", "4", "--drop-rates", "0,0.25",
          "--methods", "none,2t-abs_gate,topk", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "eval.json").read_text())["rows"]}
    assert set(rows) == {"none", "2t-abs_gate", "topk"}
    csv_lines = (tmp_path / "eval.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("method,")
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # no drop through the backend = the eager model on the same two windows
    model = ev.load_model(MODEL)
    x = ev.windows(ev.load_split("test"), 2)
    with torch.no_grad():
        logits = model(x).logits[:, :-1].float()
    loss = -F.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).mean().item()
    assert rows["none"]["measured_rate"] == 0.0 and rows["none"]["tokens"] == x.shape[0] * (x.shape[1] - 1)
    assert rows["none"]["loss"] == pytest.approx(loss, rel=1e-4)
    # static top-(k-1) drops exactly one of k pairs of every token; fitted 2T lands near its target
    assert rows["topk"]["measured_rate"] == pytest.approx(1 / model.config.num_experts_per_tok, abs=1e-9)
    assert abs(rows["2t-abs_gate"]["measured_rate"] - 0.25) < 0.08
    assert rows["2t-abs_gate"]["d_loss"] != 0.0 and 0 <= rows["topk"]["mc_accuracy"] <= 1


def test_demo_continuations_through_generate():
    """The demo's continuations: without dropping, ``generate`` through dualsparse writes the eager model's greedy
    bytes; 2T at 25 % writes as many bytes (what it writes is the model's business, not checked)."""
    plan = ev.calibrate_plan(MODEL, ev.DEFAULT_DATA, calib_windows=2, batch=2, progress=False)
    prompt = ev.load_split("test")[1000:1000 + 64]
    chosen = ev.settings((0.25,), ("none", "2t-abs_gate"))
    texts = ev.continuations(MODEL, chosen, plan, prompt, 24, inner="eager")
    model = ev.load_model(MODEL)
    with torch.no_grad():
        eager = model.generate(prompt[None], max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    assert texts["none"] == ev.as_text(eager[0, prompt.numel():])
    assert len(texts["none"]) >= 8 and len(texts["2t-abs_gate"]) >= 8


def test_shipped_files_are_found_outside_an_editable_install(tmp_path, monkeypatch):
    """After a normal ``pip install .`` the package no longer sits beside models/ and data/: the shipped checkpoint
    is then found under $DSMOE_HOME or the current directory (a checkout), and a missing one gives an error that
    names every place it looked and how to point at it."""
    repo = ev.ROOT
    monkeypatch.setattr(ev, "ROOT", tmp_path / "site-packages")  # as if installed elsewhere
    monkeypatch.delenv("DSMOE_HOME", raising=False)
    monkeypatch.chdir(repo)
    assert ev.shipped(ev.MODEL_DIR) == repo / ev.MODEL_DIR
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSMOE_HOME", str(repo))
    assert ev.shipped(ev.DATA_DIR) == repo / ev.DATA_DIR
    monkeypatch.delenv("DSMOE_HOME")
    missing = ev.shipped(ev.MODEL_DIR)
    assert not missing.exists()
    with pytest.raises(FileNotFoundError, match="DSMOE_HOME") as err:
        ev.load_model(missing)
    assert str(tmp_path) in str(err.value) and "--model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="corpus split 'test'"):
        ev.load_split("test", tmp_path / "nowhere")


def test_eval_cli_in_bf16(tmp_path):
    """``--dtype bfloat16``: the model is loaded, calibrated and run in bf16 (no drop through the backend is the eager
    bf16 model's loss, further from the fp32 loss than the two runs are from each other)."""
    from dsmoe_compiler.__main__ import main

    main(["eval", "--windows", "2", "--calib-windows", "2", "--mc-items", "0", "--drop-rates", "0",
          "--methods", "none", "--dtype", "bfloat16", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["meta"]["dtype"] == "bfloat16"
    x = ev.windows(ev.load_split("test"), 2)
    losses = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = ev.load_model(MODEL, dtype=dtype)
        assert next(model.parameters()).dtype == dtype
        with torch.no_grad():
            logits = model(x).logits[:, :-1].float()
        losses[dtype] = -F.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).mean().item()
    got = saved["rows"][0]["loss"]
    print(f"bf16 eval {got:.6f}, eager bf16 {losses[torch.bfloat16]:.6f}, eager fp32 {losses[torch.float32]:.6f}")
    assert abs(got - losses[torch.bfloat16]) < abs(losses[torch.bfloat16] - losses[torch.float32])
