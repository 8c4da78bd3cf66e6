"""`anfast export`: a run's student/ and base/ again, from a checkpoint (anfast.train.export.export_run)."""

from __future__ import annotations

import argparse
import json

from anfast.cli.args import add_run_arguments

__all__ = ["register"]


def run_export(args: argparse.Namespace) -> int:
    from anfast.train.export import export_run

    written = export_run(args.run_dir, checkpoint=args.checkpoint, onnx=args.onnx)
    print(json.dumps({name: str(path) for name, path in written.items()}, indent=2))
    return 0


def register(subparsers) -> None:
    """Add `export` to the main parser's subcommands."""
    export = subparsers.add_parser(
        "export", help="re-export a run's student/ and base/ from a checkpoint",
        description="Write RUN_DIR/student/ (and student_N/ for nested students) and "
                    "RUN_DIR/base/ as safetensors + JSON from the best or last checkpoint.")
    add_run_arguments(export)
    export.add_argument("--onnx", action="store_true",
                        help="also write student/student.onnx (needs `pip install onnx`)")
    export.set_defaults(func=run_export)
