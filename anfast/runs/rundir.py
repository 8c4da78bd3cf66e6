"""One process per run directory, and no run replaced by accident.

``claim_run_dir`` takes an exclusive ``flock`` on RUN_DIR/.anfast.lock for the life
of the run, so a second ``anfast train`` (or ``search``) on the same --out stops at
once, naming the holder, instead of interleaving metrics.jsonl and overwriting
checkpoints. The kernel drops a flock when its holder dies, even by kill -9; the file,
with the dead holder's pid, host and start time, stays, so the next run takes the lock
over and says whose it was. A clean exit deletes the file while still holding the lock;
a process that opened the old file just before then sees, after its flock, that the
path now names another inode (or none) and tries again, so two processes never hold
locks on two different files under one name.

A directory that already holds a run's files is refused unless the caller continues
it (--resume) or replaces it (--overwrite, which deletes only those files, and only
when the caller calls ``RunDirLock.remove_previous_run`` once its own set-up has
passed: a typo in another option must not cost the old run). ``--resume auto`` in a
directory whose run saved no checkpoint yet restarts that run from its config.yaml
(``restart_options``), never from the defaults, and refuses one that did work a restart
would replace.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, Optional, Sequence

import yaml

from anfast.runs.errors import ConfigError

__all__ = ["RunDirLock", "claim_run_dir", "restart_options", "TRAIN_ARTIFACTS", "SEARCH_ARTIFACTS",
           "LOCK_NAME"]

LOCK_NAME = ".anfast.lock"
# What `anfast train` writes into RUN_DIR (glob patterns); --overwrite removes these only.
TRAIN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard",
                   "curves.png", "tradeoff.png", "eval.json", "base", "student", "student_*",
                   "arch_config.json")
# What a finished run (and `anfast eval` of it) writes: work a restart from step 0 would replace.
FINISHED_WORK = ("summary.json", "eval.json", "base", "student", "student_*")
# What `anfast search` writes: its own records and, as a run of the training engine, its checkpoints.
SEARCH_ARTIFACTS = ("search_config.json", "config.yaml", "metrics.jsonl", "tensorboard", "checkpoints",
                    "arch.json", "widths.png")


class RunDirLock:
    """An exclusive lock on ``run_dir`` held by this process until ``release()``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file: Optional[IO[str]] = None
        self._created_dir = False
        self._replaced: Sequence[str] = ()  # artifact patterns of a run --overwrite replaces

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the process that holds it."""
        try:
            self._created_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                file = open(self.path, "a+")
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _describe(_read(file))
                    file.close()
                    raise ConfigError(f"--out {self.run_dir} is in use by another run ({holder}); "
                                      f"wait for it to end or choose another --out") from None
                if _same_file(file, self.path):
                    break
                # The holder released and deleted this file between our open and flock.
                file.close()
        except OSError as error:
            raise ConfigError(f"--out {self.run_dir}: cannot write there ({error.strerror}); "
                              f"choose a writable directory") from None
        previous = _read(file)
        if previous:
            print(f"anfast: --out {self.run_dir}: taking over the lock of {_describe(previous)}, "
                  f"which is no longer running", file=sys.stderr)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "command": " ".join(sys.argv)}) + "\n")
        file.flush()
        self._file = file

    def remove_previous_run(self) -> None:
        """Delete the replaced run's files (``claim_run_dir(..., overwrite=True)``); call it
        when set-up has passed, just before the new run writes. Only the artifact patterns
        are deleted, never other files, and never without the lock held."""
        if self._file is None:
            raise RuntimeError(f"remove_previous_run: the lock on {self.run_dir} is not held")
        for path in sorted({path for pattern in self._replaced for path in self.run_dir.glob(pattern)}):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self._replaced = ()

    def release(self) -> None:
        """Delete the lock file, unlock, and remove RUN_DIR if this lock created it and it is
        still empty (a run refused at set-up leaves nothing behind). Safe to call twice."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        if self._created_dir and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(file: IO[str]) -> str:
    file.seek(0)
    return file.read().strip()


def _same_file(file: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no pid"


def claim_run_dir(run_dir: Path, artifacts: Sequence[str], *, resume: Optional[bool], overwrite: bool
                  ) -> RunDirLock:
    """Lock ``run_dir``; refuse it when it holds a run that is neither resumed nor overwritten.

    ``resume`` is None for commands that cannot continue a run. With ``overwrite`` the
    previous run's files are deleted by ``lock.remove_previous_run()`` (``artifacts`` and
    those of every other kind of run: a search's arch.json, a training's exports), which the
    caller runs once its set-up has passed (never before the lock is taken, so a live run
    is never touched; never before the new run's options are checked, so a bad option
    keeps the old run). Returns the held lock; release it at the end.
    """
    lock = RunDirLock(run_dir)
    lock.acquire()
    try:
        found = sorted({path for pattern in artifacts for path in Path(run_dir).glob(pattern)})
        if found and not resume and not overwrite:
            names = ", ".join(path.name for path in found[:4]) + (", ..." if len(found) > 4 else "")
            fix = ("continue it with --resume auto, or replace it with --overwrite" if resume is not None
                   else "replace it with --overwrite, or choose another --out")
            raise ConfigError(f"--out {run_dir} already holds a run ({names}); {fix}")
        if overwrite:  # the old run may be of another kind (a search replaced by a training)
            lock._replaced = tuple(dict.fromkeys((*artifacts, *TRAIN_ARTIFACTS, *SEARCH_ARTIFACTS)))
    except BaseException:
        lock.release()
        raise
    return lock


def restart_options(run_dir: Path) -> Dict[str, Any]:
    """The options ``--resume auto`` restarts a run with when RUN_DIR has no checkpoint: its
    config.yaml's, less where it runs (out, resume, overwrite); empty for a directory that
    holds no config.yaml (a fresh start). Raises ConfigError when the directory holds work
    a restart from step 0 would replace (an epoch's metrics, exports, summary.json)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    work = sorted(path.name for pattern in FINISHED_WORK for path in run_dir.glob(pattern))
    if metrics.is_file() and metrics.read_text().strip():
        work.insert(0, "metrics.jsonl")
    if work:
        raise ConfigError(f"--resume auto: {run_dir} holds a run ({', '.join(work)}) but no checkpoint "
                          f"to continue it from ({run_dir / 'checkpoints'} has none); restore its "
                          f"checkpoints, or start it again with --overwrite (which deletes it)")
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    saved = load_config(str(config))
    return {name: value for name, value in saved.items() if name not in ("out", "resume", "overwrite")}


def load_config(path: str) -> Dict[str, Any]:
    """The options in a YAML file, as a dict of TrainConfig field names."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        # safe_load builds plain values only: a tag such as !!python/object is refused, never run.
        values = yaml.safe_load(file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        problem = " ".join(str(error).split())[:300]
        raise ConfigError(f"{path} is not a YAML file of plain option: value lines ({problem}); fix "
                          f"or restore it") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in values.items()}
