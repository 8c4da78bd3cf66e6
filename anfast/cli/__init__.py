"""The ``anfast`` command: train | eval | export | search | tune | info | data.

One module per command (anfast/cli/<command>.py, each with ``register(subparsers)``);
the flags several commands share are declared once in anfast/cli/args.py. Commands
raise; ``main`` is the one place that prints an error: one line for an error the user
can fix (``user_error``), the traceback for a bug or with ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Optional, Sequence

from anfast.cli import data, export, info, search, train, tune
from anfast.runs.errors import RunStoppedError
from anfast.cli import eval as evaluate

__all__ = ["main", "build_parser", "user_error"]

# Each module adds its subcommand with register(subparsers), in the order of --help.
_COMMAND_MODULES = (train, evaluate, export, search, tune, info, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anfast", description="Train compressed CNNs with Adjoined Networks (base + students).")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    for command in subparsers.choices.values():
        # SUPPRESS: a subcommand's unset flag must not reset `anfast --debug train`.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, show the full traceback instead of one line")
    return parser


# Disk, permission and path failures a user fixes outside anfast (a file where a folder
# is to be made or read, a folder where a file is to be written); other OSErrors are bugs.
_USER_ERRNOS = {errno.ENOSPC: "free disk space or choose another --out",
                errno.EDQUOT: "free disk space or choose another --out",
                errno.EACCES: "choose a directory you can write, or fix its permissions",
                errno.EPERM: "choose a directory you can write, or fix its permissions",
                errno.EROFS: "the file system is read-only; choose another --out",
                errno.EEXIST: "a file or folder is already there; move it or choose another path",
                errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
                errno.EISDIR: "that is a folder; give a file path"}


def user_error(error: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug."""
    from anfast.adjoin import AdjoinError
    from anfast.dan.space import DanError
    from anfast.data import DataLayoutError
    from anfast.export import ExportError
    from anfast.runs.checkpoint import CheckpointError, DiskFullError
    from anfast.runs.errors import ConfigError, RunStoppedError

    # ImportError: an optional dependency the options need (apex, onnx, timm).
    if isinstance(error, (ConfigError, DataLayoutError, DanError, CheckpointError, ExportError,
                          AdjoinError, FileNotFoundError, RunStoppedError, ImportError)):
        return " ".join(str(error).split())
    if isinstance(error, DiskFullError):
        return f"{error.strerror} ({error.filename}): {error.space()}; {_USER_ERRNOS[error.errno]}"
    if isinstance(error, OSError) and error.errno in _USER_ERRNOS:
        # A rename's failure (os.replace) names its source and target.
        where = (f" ({error.filename} -> {error.filename2})" if error.filename2
                 else f" ({error.filename})" if error.filename else "")
        return f"{error.strerror}{where}; {_USER_ERRNOS[error.errno]}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``anfast`` command; an error the user acts on prints one line and returns 2
    (1 for a run that stopped itself: RunStoppedError); ``--debug`` raises it with its
    traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except Exception as error:
        message = user_error(error)
        if message is None or args.debug:
            raise
        print(f"anfast {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1 if isinstance(error, RunStoppedError) else 2


if __name__ == "__main__":
    sys.exit(main())
