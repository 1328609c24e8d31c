"""Train the shipped MoE: a byte-level Qwen3-MoE on the Python documentation corpus (``data/pydocs``).

    PYTHONUNBUFFERED=1 python training/train.py --out OUT_DIR [--time-budget 390]

Model (``transformers.Qwen3MoeForCausalLM``, loads with ``from_pretrained(dir)``): 6 layers, hidden
256, 8 heads (4 KV heads, head dim 32), every layer sparse with 32 experts of 64 neurons, top-4 with
renormalised top-k weights (``norm_topk_prob``), tied embeddings, context 512; tokenizer
``ByT5Tokenizer(extra_ids=0)``: token = UTF-8 byte + 3 (pad 0, eos 1, unk 2), 259 tokens.

Training: random 512-byte windows of the train split, AdamW (lr 2e-3, betas 0.9/0.95, weight decay
0.1, grad clip 1), linear warm-up then cosine decay to 10 %, bf16 autocast on CUDA, transformers'
load-balancing loss (coef 0.01). The step count is set after 20 timed steps so that training ends
within ``--time-budget`` seconds (and after at most ``--max-epochs`` passes over the train split).
Progress (train loss, load-balancing loss, calib loss every ``--eval-every`` steps) goes to stdout
and ``train_log.txt``.

At the end the weights are rounded to bf16 and saved (shards <= 12 MB), and ``metrics.json`` records
held-out (``test`` split) loss / perplexity / byte accuracy computed from the saved bf16 weights in
fp32 (TF32 off): on the first ``RECORD_WINDOWS`` 512-byte windows (what ``tests/test_model.py``
recomputes on CPU) and on the whole test split. Self-contained on purpose (runs on a machine where
the project is not installed).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import pathlib
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFSET = 3  # ByT5: ids 0-2 are pad, eos, unk
VOCAB = 256 + OFFSET
SEQ = 512
RECORD_WINDOWS = 32


def load_split(name: str) -> torch.Tensor:
    data = lzma.open(ROOT / "data" / "pydocs" / f"{name}.txt.xz").read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) + OFFSET


def model_config(experts_implementation: str):
    import transformers as tf

    config = tf.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=32, num_experts_per_tok=4,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=SEQ,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.01,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, use_cache=False)
    config._experts_implementation = experts_implementation
    return config


def windows(ids: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Non-overlapping SEQ-token windows from the start of ``ids`` (the evaluation protocol)."""
    count = ids.numel() // SEQ if n is None else min(n, ids.numel() // SEQ)
    return ids[: count * SEQ].view(count, SEQ)


@torch.no_grad()
def heldout_metrics(model, ids: torch.Tensor, batch: int, device) -> dict:
    """Mean next-token NLL, perplexity and accuracy over positions 1..SEQ-1 of every window."""
    nll, correct, count = 0.0, 0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch].to(device)
        logits = model(x, output_router_logits=False).logits.float()
        target = x[:, 1:]
        lp = F.log_softmax(logits[:, :-1], dim=-1)
        nll += -lp.gather(-1, target[..., None]).sum().item()
        correct += (logits[:, :-1].argmax(-1) == target).sum().item()
        count += target.numel()
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count, "tokens": count,
            "windows": ids.shape[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-budget", type=float, default=390.0, help="seconds of training steps")
    parser.add_argument("--max-epochs", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="for a smoke test")
    args = parser.parse_args(argv)

    import transformers as tf

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    train, calib, test = load_split("train"), load_split("calib"), load_split("test")
    log(f"torch {torch.__version__}, transformers {tf.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    log(f"corpus bytes: train {train.numel():,} calib {calib.numel():,} test {test.numel():,}")

    calib_windows = windows(calib, 64)
    gen = torch.Generator().manual_seed(args.seed)

    def batch_of(n):
        start = torch.randint(0, train.numel() - SEQ, (n,), generator=gen)
        return train[start[:, None] + torch.arange(SEQ)].to(device, non_blocking=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model = None
    for impl in ("grouped_mm", "batched_mm", "eager"):  # fastest that trains on this torch/transformers
        try:
            torch.manual_seed(args.seed)
            model = tf.Qwen3MoeForCausalLM(model_config(impl)).to(device)
            with autocast:
                model(batch_of(2), labels=batch_of(2)).loss.backward()
            model.zero_grad(set_to_none=True)
            break
        except Exception as exc:  # noqa: BLE001 - any failure: try the next implementation
            log(f"experts_implementation={impl} failed ({type(exc).__name__}: {str(exc)[:200]}); trying the next")
            model = None
    assert model is not None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Qwen3MoeForCausalLM, {n_params:,} parameters, experts_implementation={impl}, config "
        + json.dumps({k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                             "num_experts_per_tok", "moe_intermediate_size")}))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    tokens_per_step = args.batch * SEQ
    max_steps_epochs = int(args.max_epochs * train.numel() / tokens_per_step)
    total_steps = args.max_steps or max_steps_epochs

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def calib_loss():
        model.eval()
        with autocast:
            m = heldout_metrics(model, calib_windows, 32, device)
        model.train()
        return m["loss"]

    model.train()
    t_start = time.perf_counter()
    step, timed_from, run_loss, run_aux = 0, None, 0.0, 0.0
    while step < total_steps:
        if step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            timed_from = time.perf_counter()
        if step == 30 and args.max_steps is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - timed_from) / 20
            by_time = int((args.time_budget - (time.perf_counter() - t_start)) / (step_s * 1.04)) + step
            total_steps = min(max_steps_epochs, by_time)
            log(f"step time {step_s * 1e3:.1f} ms ({tokens_per_step / step_s:,.0f} tokens/s): "
                f"{total_steps} steps = {total_steps * tokens_per_step / train.numel():.2f} epochs")
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = batch_of(args.batch)
        with autocast:
            out_ = model(x, labels=x)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_loss += out_.loss.detach()
        run_aux += out_.aux_loss.detach()
        if step % 50 == 0 or step == total_steps:
            n = 50 if step % 50 == 0 else step % 50
            msg = (f"step {step:5d}/{total_steps} lr {lr_at(step - 1):.2e} loss {run_loss.item() / n:.4f} "
                   f"(load-balancing {run_aux.item() / n:.4f}) elapsed {time.perf_counter() - t_start:.0f} s")
            if step % args.eval_every == 0 or step == total_steps:
                msg += f" | calib loss {calib_loss():.4f}"
            log(msg)
            run_loss, run_aux = 0.0, 0.0
    train_s = time.perf_counter() - t_start
    log(f"trained {step} steps, {step * tokens_per_step:,} tokens ({step * tokens_per_step / train.numel():.2f} "
        f"epochs) in {train_s:.0f} s")

    # ---- save in bf16, then record held-out metrics of exactly the saved weights, in fp32 ----------------
    model.eval()
    model.config.output_router_logits = False
    model.config._experts_implementation = "eager"
    model.to(torch.bfloat16).save_pretrained(out / "model", max_shard_size="12MB")
    tf.ByT5Tokenizer(extra_ids=0).save_pretrained(out / "model")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.float()
    with torch.no_grad():
        expert_load = []
        probe = windows(test, 16).to(device)
        router_logits = model(probe, output_router_logits=True).router_logits
        for layer_logits in router_logits:
            idx = layer_logits.float().softmax(-1).topk(model.config.num_experts_per_tok, -1).indices
            load = torch.bincount(idx.flatten(), minlength=model.config.num_experts).float()
            expert_load.append((load / load.sum()).tolist())
    metrics = {
        "recorded_on": f"{device} torch {torch.__version__} transformers {tf.__version__}, fp32 from the saved bf16 weights",
        "protocol": f"non-overlapping {SEQ}-token windows from the start of the test split; positions 1..{SEQ - 1}",
        "test_first_windows": heldout_metrics(model, windows(test, RECORD_WINDOWS), 16, device),
        "test_all": heldout_metrics(model, windows(test), 16, device),
        "calib_first_64_windows": heldout_metrics(model, calib_windows, 16, device),
        "expert_load_per_layer_test16": expert_load,
        "training": {"steps": step, "tokens": step * tokens_per_step, "seconds": round(train_s, 1),
                     "batch": args.batch, "seq": SEQ, "lr": args.lr, "seed": args.seed,
                     "experts_implementation": impl, "parameters": n_params},
    }
    (out / "model" / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log("held-out (test): " + json.dumps({k: metrics[k] for k in ("test_first_windows", "test_all")}))
    loads = torch.tensor(expert_load)
    log(f"expert load on 16 test windows: min {loads.min():.3f} max {loads.max():.3f} (uniform {1 / loads.shape[1]:.3f})")
    log_file.close()
    os.replace(out / "train_log.txt", out / "model" / "train_log.txt")


if __name__ == "__main__":
    main()
