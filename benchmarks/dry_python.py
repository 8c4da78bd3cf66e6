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

Each command is a Python start-up that imports torch (3 s on a 2-core VM, most of a
parse), so a whole rehearsal can share one: ``dry_python.py --serve SOCKET`` imports
torch, anfast and pytest once and forks a child per command; with
``DRY_PYTHON_SERVER=SOCKET`` in the environment, ``dry_python.py ARGS`` hands its command
line, working directory, environment and stdin / stdout / stderr to that server and
exits with the child's status as Python would give it (128 + N for a signal N; a client
killed by gpu_check's ``timeout`` takes its command with it). A fork has the server's
modules: a command that would import anfast from another checkout is refused, and what
Python reads only at start-up (PYTHONWARNINGS, -X options) is the server's. A client
imports nothing heavy::

    python benchmarks/dry_python.py --serve /tmp/dry.sock &
    DRY_PYTHON_SERVER=/tmp/dry.sock PYTHON="python benchmarks/dry_python.py" NCU=/none \
        bash benchmarks/gpu_check.sh /tmp/dry engine_correct cuda_correct ...
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import socket
import sys
import threading
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


_FDS = 3  # stdin, stdout, stderr travel with each request


def _request(server: str, argv: List[str]) -> int:
    """Run ``argv`` in the server's fork and return its exit status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(server)
        message = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(connection, [len(message).to_bytes(8, "big")], [0, 1, 2])
        connection.sendall(message)
        status = connection.recv(16)
    if not status:
        print(f"dry_python: the server at {server} ended before answering {' '.join(argv)}", file=sys.stderr)
        return 1
    return int(status)


def _receive(connection: socket.socket):
    header, fds, _, _ = socket.recv_fds(connection, 8, _FDS)
    size, body = int.from_bytes(header, "big"), b""
    while len(body) < size:
        chunk = connection.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the client hung up mid-request")
        body += chunk
    return json.loads(body), fds


def _anfast_elsewhere(argv: List[str]) -> str:
    """Where this command would import anfast from, if not where the server did ("" if
    the same): a fork runs the server's modules, so another checkout's rehearsal would
    check this one's parsers."""
    import anfast

    here = os.path.dirname(os.path.dirname(os.path.abspath(anfast.__file__)))
    first = [os.getcwd()] if argv[:1] == ["-m"] else [os.path.dirname(os.path.abspath(argv[0]))] if argv else []
    for folder in first + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]:
        if os.path.isfile(os.path.join(folder, "anfast", "__init__.py")):
            return "" if os.path.samefile(folder, here) else folder
    return ""


def _serve_one(connection: socket.socket, listener: socket.socket) -> None:
    """In the forked child: become the client's process, run its command line and exit
    with its status (the server reads it with waitpid and answers the client)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    listener.close()
    request, fds = _receive(connection)
    for fd, target in zip(fds, range(_FDS)):
        os.dup2(fd, target)
        os.close(fd)
    # A client that is gone (killed by gpu_check's `timeout`) takes its command with it.
    threading.Thread(target=lambda: connection.recv(1) or os._exit(128 + signal.SIGTERM), daemon=True).start()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # What a fresh `python` would have on sys.path: the PYTHONPATH of this command. What
    # Python reads only at start-up (PYTHONWARNINGS, -X options) stays the server's.
    sys.path[1:1] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if request["argv"][:1] == ["-m"]:
        sys.path.insert(0, request["cwd"])  # `python -m` puts the working directory first
    status = 1
    try:
        elsewhere = _anfast_elsewhere(request["argv"])
        if elsewhere:
            print(f"dry_python: this server imported anfast from another checkout than {elsewhere}, where "
                  f"this command would import it; start a server there", file=sys.stderr)
            status = 2
        else:
            status = main(request["argv"])
    except SystemExit as error:  # as Python ends on one: a number, None (0) or a message (1)
        status = error.code if isinstance(error.code, int) else 0 if error.code is None else 1
        if not isinstance(error.code, (int, type(None))):
            print(error.code, file=sys.stderr)
    except KeyboardInterrupt:  # as Python ends on one: by SIGINT
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status & 0xFF)


def _answer_finished(waiting: dict) -> None:
    """Send each finished child's exit status (128 + N for a signal N) to its client."""
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        connection = waiting.pop(pid)
        try:
            connection.sendall(str(code if code >= 0 else 128 - code).encode())
        except OSError:  # the client is gone
            pass
        connection.close()


def serve(path: str) -> int:
    """Accept requests on the Unix socket ``path`` until killed, one forked child each."""
    import torch  # noqa: F401  what every command imports: once, here, before the forks

    import anfast.cli  # noqa: F401
    import pytest  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(0.05)  # how often finished children are answered
    waiting: dict[int, socket.socket] = {}
    print(f"dry_python: serving on {path}", flush=True)
    while True:
        try:
            connection, _ = listener.accept()
        except socket.timeout:
            _answer_finished(waiting)
            continue
        connection.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _serve_one(connection, listener)
        waiting[pid] = connection
        _answer_finished(waiting)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"] and len(sys.argv) == 3:
        sys.exit(serve(sys.argv[2]))
    if os.environ.get("DRY_PYTHON_SERVER"):
        sys.exit(_request(os.environ["DRY_PYTHON_SERVER"], sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
