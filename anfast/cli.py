"""The ``anfast`` command: train | search | tune | eval | export | info | data."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from anfast import info, tune
from anfast.dan import cli as dan_cli
from anfast.data import cli as data_cli
from anfast.train import cli as train_cli

__all__ = ["main", "build_parser"]

# Each module adds its subcommands with register(subparsers).
_COMMAND_MODULES = (train_cli, dan_cli, tune, info, data_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anfast", description="Train compressed CNNs with Adjoined Networks (base + students).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
