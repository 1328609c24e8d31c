"""Command line: ``python -m dsmoe_compiler demo`` and ``python -m dsmoe_compiler eval``."""

from __future__ import annotations

import argparse


def demo(args) -> None:
    """The shipped MoE: calibrate, compile with dualsparse at 0 % and 25 % drop, print a table, save a plot."""
    from dsmoe_compiler.evaluate import main_demo

    main_demo(args)


def evaluate(args) -> None:
    """Accuracy versus measured compute drop for every drop method (dsmoe_compiler/evaluate.py)."""
    from dsmoe_compiler.evaluate import main_eval

    main_eval(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsmoe_compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    from dsmoe_compiler.evaluate import add_arguments

    p = sub.add_parser("demo", help="the shipped MoE at 0 %% and 25 %% drop: accuracy, perplexity, drop rate, time")
    add_arguments(p, demo=True)
    p.set_defaults(func=demo)
    p = sub.add_parser("eval", help="accuracy vs measured drop rate for every drop method; CSV, JSON, PNG")
    add_arguments(p)
    p.set_defaults(func=evaluate)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
