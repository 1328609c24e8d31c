"""Command line: ``python -m dsmoe_compiler demo``."""

from __future__ import annotations

import argparse
import time


def demo(args) -> None:
    """Build a small OLMoE from a config (no hub), compile it with dualsparse, check it against eager."""
    import torch
    import transformers as tf

    import dsmoe_compiler

    torch.manual_seed(0)
    config = tf.OlmoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._experts_implementation = args.experts_implementation
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 512, (2, 64))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="dualsparse", options={"inner": args.inner, "partition": args.partition})
        t0 = time.perf_counter()
        got = compiled(ids).logits
        compile_s = time.perf_counter() - t0
    rel = ((got - expected).norm() / expected.norm()).item()
    print(dsmoe_compiler.last_report())
    print(f"\nOLMoE-shaped model, 4 layers x 16 experts (top-4), experts_implementation={args.experts_implementation}, "
          f"partition P={args.partition}")
    print(f"first compiled call (compile included) {compile_s:.1f} s | "
          f"relative error of logits vs eager {rel:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsmoe_compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a small OLMoE with dualsparse and compare it with eager")
    p.add_argument("--experts-implementation", default="eager", choices=["eager", "grouped_mm", "batched_mm"])
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager", "aot_eager"])
    p.add_argument("--partition", type=int, default=2)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
