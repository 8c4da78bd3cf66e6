"""A stand-in for ``python`` that rehearses benchmarks/gpu_check.sh where there is no GPU.

    PYTHON="python benchmarks/dry_python.py" NCU=/none bash benchmarks/gpu_check.sh /tmp/dry \\
        engine_correct cuda_correct step_engine tune train_bench census ...

Every Python command of gpu_check.sh then comes here instead of to Python:

- a script (``benchmarks/X.py``) or a module (``-m anfast``) runs until its argument
  parser has accepted the command line, and exits 0 there: a flag it does not know,
  or a value its parser refuses, exits 2 as it would on the GPU machine;
- ``-m pytest`` only collects (``--collect-only``; without pytest-xdist's ``-n``): a
  test file that is gone exits 4 and a selection that collects nothing exits 5;
- ``-m pip`` is not run (the install step is the GPU machine's own);
- ``-c CODE`` runs as it is (gpu_check.sh asks that way which plugins are installed).

So a renamed flag, test file, marker or subcommand shows on the CPU, before a
15-minute lease, instead of during it. What a program checks only after its parser
returns (a provider name, a device) is not rehearsed: it runs on the GPU machine.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import List


class _Accepted(SystemExit):
    """Raised where the rehearsed program's parser returned: its command line is accepted."""


def _without_xdist(args: List[str]) -> List[str]:
    """``args`` without pytest-xdist's ``-n N`` (gpu_check.sh's form of it)."""
    if "-n" not in args:
        return args
    at = args.index("-n")
    return args[:at] + args[at + 2:]


def _parse_then_stop(original):
    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Accepted(0)
    return parse_args


def main(argv: List[str]) -> int:
    if not argv:
        print("dry_python: usage: dry_python.py (SCRIPT | -m MODULE | -c CODE) [ARG ...]", file=sys.stderr)
        return 2
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        return 0
    if argv[0] == "-m" and argv[1] == "pip":
        print(f"dry_python: not run: pip {' '.join(argv[2:])}")
        return 0
    if argv[0] == "-m" and argv[1] == "pytest":
        import pytest

        return int(pytest.main([*_without_xdist(argv[2:]), "--collect-only", "-q"]))

    argparse.ArgumentParser.parse_args = _parse_then_stop(argparse.ArgumentParser.parse_args)
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except _Accepted:
        print(f"dry_python: accepted: {' '.join(argv)}")
        return 0
    print(f"dry_python: {' '.join(argv)} ended without parsing a command line", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
