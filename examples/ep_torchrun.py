"""Expert parallelism on a transformers MoE with torchrun (CPU/gloo or GPU/NCCL).

    torchrun --nproc-per-node 2 examples/ep_torchrun.py            # CPU: gloo
    torchrun --nproc-per-node 8 examples/ep_torchrun.py --drop     # 8 GPUs: NCCL, 2T-Drop + load-aware thresholds
    torchrun --nproc-per-node 2 examples/ep_torchrun.py --shard    # each rank keeps only its experts' weights
    torchrun --nproc-per-node 2 examples/ep_torchrun.py --arch dbrx --shard   # another of the tests' tiny models

Every rank builds the same model (same seed here; in practice: from_pretrained of the same
checkpoint), takes its own share of the batch, and runs the compiled model. The dualsparse backend
gives rank r the sub-experts ``dist.expert_ranges(E*P, W)[r:r+2]`` and inserts the dispatch /
combine all_to_all around them. Without dropping, each rank's logits equal the uncompiled model's
on its tokens; this script checks that and prints each rank's EP statistics. With ``--shard``,
``dist.shard_experts_(model, group, partition)`` first drops the other ranks' experts from every
rank's parameters (same group and partition as the compile options); the sharded model runs only
through the compiled EP graph.
"""

import argparse
import os
import sys

import torch
import transformers as tf

import dsmoe_compiler  # noqa: F401  (registers the backend)
from dsmoe_compiler.runtime import dist as ds_dist
from dsmoe_compiler.runtime import ep, load_aware


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drop", action="store_true", help="2T-Drop with load-aware (literal) thresholds")
    ap.add_argument("--shard", action="store_true", help="keep only this rank's experts (dist.shard_experts_)")
    ap.add_argument("--arch", default="olmoe", help="olmoe (built here), or a tiny model of tests/models.py "
                    "(e.g. dbrx, longcat_flash: experts of their own, zero-computation experts)")
    args = ap.parse_args()
    group = ds_dist.init()  # NCCL if CUDA is available, else gloo; timeout: DUALSPARSE_DIST_TIMEOUT (s)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    torch.manual_seed(0)  # the same weights on every rank
    if args.arch == "olmoe":
        config = tf.OlmoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = tf.AutoModelForCausalLM.from_config(config)
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from models import hf_model  # seeded: the same random weights on every rank

        model = hf_model(args.arch, None)
    model = model.to(device).eval()

    batch = torch.randint(3, 96, (world * 2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    mine = batch[rank::world]  # per-rank tokens: each rank its share of the batch

    with torch.no_grad():
        want = model(mine).logits  # the uncompiled model on this rank's tokens (before sharding: it needs every expert)
    options = {"expert_parallel": group, "partition": 2, "stats": True}
    if args.shard:
        before = sum(p.numel() * p.element_size() for p in model.parameters())
        ds_dist.shard_experts_(model, group, partition=options["partition"])
        after = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"rank {rank}: parameter bytes {before} -> {after} after shard_experts_", flush=True)
    if args.drop:
        options.update(drop="2t", threshold=0.48)
        load_aware.set_policy(load_aware.literal)  # or steep(2.0), shift_centre(), or your own LoadInfo -> [W, 2]
    compiled = torch.compile(model, backend="dualsparse", options=options)
    with torch.no_grad():
        got = compiled(mine).logits
    err = (got - want).abs().max().item()
    print(f"rank {rank}/{world}: max |compiled - eager| = {err:.2e}; EP blocks: "
          f"{dsmoe_compiler.last_report().counters['expert_parallel']}; stats: "
          f"{[(n, s['load_before'], s['load_after']) for n, s in ep.ep_stats().items()]}", flush=True)
    if not args.drop and err > 1e-4:
        raise SystemExit(f"rank {rank}: compiled EP model differs from eager by {err}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
