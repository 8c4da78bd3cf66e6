"""`anfast eval`: top-1, top-5 and loss of a run's base and students (anfast.train.export.evaluate_run)."""

from __future__ import annotations

import argparse

from anfast.cli.args import add_run_arguments

__all__ = ["register"]


def run_eval(args: argparse.Namespace) -> int:
    from anfast.train.export import evaluate_run

    evaluate_run(args.run_dir, data=args.data, checkpoint=args.checkpoint,
                 batch_size=args.batch_size, workers=args.workers, device=args.device)
    return 0


def register(subparsers) -> None:
    """Add `eval` to the main parser's subcommands."""
    evaluate = subparsers.add_parser(
        "eval", help="evaluate a run's base and students",
        description="Top-1, top-5 and loss of the base and every student of a run's "
                    "checkpoint; prints a table and writes RUN_DIR/eval.json.")
    add_run_arguments(evaluate)
    evaluate.add_argument("--data", help="data root (default: the run's --data)")
    evaluate.add_argument("--batch-size", type=int, help="default: the run's")
    evaluate.add_argument("--workers", type=int, help="default: the run's")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: auto, cuda if available, else cpu; "
                                           "a run trained with --amp fp16 is evaluated in fp32 off CUDA)")
    evaluate.set_defaults(func=run_eval)
