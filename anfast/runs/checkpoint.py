"""Checkpoints that survive kill -9 and load with ``torch.load(weights_only=True)``.

A checkpoint is written to a temp file in the same directory, flushed and fsynced,
then renamed over the old one with os.replace (atomic on POSIX), and the directory
is fsynced so the rename itself is durable. A reader therefore sees the old file or
the new one, never half of one. Only tensors and plain Python values go in, so
loading never unpickles arbitrary objects; RNG states are stored as tensors.

``keep_previous`` (used for last.pt) first hard-links the current file as
last.prev.pt, again through a temp name and a rename, so at every instant both a
last.pt and (after the second save) a last.prev.pt exist: a file damaged after it was
written (disk error, a copy cut short) still leaves the checkpoint before it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from anfast.runs.errors import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "load_training_checkpoint", "previous_checkpoint",
           "CheckpointError", "get_rng_state", "set_rng_state", "rank_rng_state", "checkpoint_world_size",
           "remove_stale_temp_files",
           "newest_usable_checkpoint", "auto_resume_checkpoint", "resume_checkpoint", "RESUME_CANDIDATES",
           "reporting_full_disk", "tensor_bytes", "DiskFullError", "write_text_atomically"]

_TEMP_SUFFIX = ".tmp"
# What a resumable training checkpoint holds besides the loop's counters.
TRAINING_KEYS = ("model", "optimizer", "scaler", "ema", "rng", "config", "classes", "epoch", "step")


# The checkpoints of RUN_DIR/checkpoints a run can continue from, newest first in a healthy run.
RESUME_CANDIDATES = ("last.pt", "last.prev.pt", "best.pt")


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, unsafe to unpickle, or not an anfast checkpoint;
    ``reason`` is what is wrong with the file, without the advice."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason or message


def previous_checkpoint(path: Union[str, Path]) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the file ``path`` replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path], keep_previous: bool = False) -> None:
    """Atomically write ``state`` to ``path`` (see the module docstring); a full disk raises
    DiskFullError naming ``path`` and the space it needs (``reporting_full_disk``)."""
    path = Path(path)

    def keep_the_replaced_file():
        _link_atomically(path, previous_checkpoint(path))

    keep = keep_the_replaced_file if keep_previous and path.is_file() else None
    with _replacing(path, tensor_bytes(state), binary=True, before_replace=keep) as file:
        torch.save(state, file)


def write_text_atomically(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` as a checkpoint is written: a reader (or a run resumed
    after kill -9) sees the old file or the new one, never half of one. For the files a
    run's state is read back from (config.yaml, summary.json, eval.json, ...); a full disk
    raises DiskFullError naming ``path``."""
    with _replacing(Path(path), len(text.encode()), binary=False) as file:
        file.write(text)


@contextlib.contextmanager
def _replacing(path: Path, needed_bytes: int, binary: bool, before_replace=None) -> Iterator[IO]:
    """A temp file in ``path``'s directory to write; on leaving, it is flushed, fsynced and
    renamed over ``path`` (after ``before_replace()``), and the directory is fsynced. On an
    error the temp file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with reporting_full_disk(path, needed_bytes):
            with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
            if before_replace is not None:
                before_replace()
            os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # write() names no file
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# A full disk, or a full quota: the user frees space or writes elsewhere.
_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """OSError ENOSPC / EDQUOT for ``filename``, with the bytes writing it needs and the bytes free."""

    def __init__(self, errno_: int, strerror: str, filename: str, *, needed_bytes: int, free_bytes: int):
        super().__init__(errno_, strerror, filename)
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes

    def space(self) -> str:
        """"about 128.2 MiB needed, 3.1 MiB free"."""
        return f"about {_megabytes(self.needed_bytes)} needed, {_megabytes(self.free_bytes)} free"


@contextlib.contextmanager
def reporting_full_disk(path: Union[str, Path], needed_bytes: int) -> Iterator[None]:
    """Turn a full disk met while writing ``path`` into DiskFullError naming ``path``, the
    space it needs and the space left, however deep the writer buried it: torch.save and
    safetensors raise a RuntimeError with the ENOSPC only in its chain."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised unless a full disk is in its chain
        cause: Optional[BaseException] = error
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in _FULL_DISK_ERRNOS):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        free = shutil.disk_usage(_existing_parent(Path(path))).free
        raise DiskFullError(cause.errno, os.strerror(cause.errno), str(path), needed_bytes=needed_bytes,
                            free_bytes=free) from error


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (nested dicts, lists, tuples): what writing it takes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _link_atomically(source: Path, target: Path) -> None:
    """Make ``target`` name the file ``source`` names, replacing any old ``target`` in one rename."""
    temp = target.with_name(f".{target.name}.link{_TEMP_SUFFIX}")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, temp)
    os.replace(temp, target)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
                    mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``, tensors and plain values only.

    Raises CheckpointError naming the file, the previous checkpoint and the fix when
    the file is damaged (empty, truncated, not a torch file) or holds Python objects
    that ``weights_only`` refuses; those are never unpickled. ``mmap`` maps the tensors
    instead of reading them, for a caller that needs only the plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint file, or "
                                f"--resume auto to start fresh when there is none")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = re.search(r"unsupported GLOBAL (\S+)", str(error))
        if "Weights only load failed" not in str(error):
            raise _damaged(path, f"{type(error).__name__}: {error}") from None
        what = refused.group(1) if refused else "not a tensor or plain value"
        raise CheckpointError(
            f"{path} was refused as unsafe: it holds a Python object ({what}) that loading "
            f"would have to execute, and anfast checkpoints never do; use a checkpoint written "
            f"by anfast train", reason=f"refused as unsafe: it holds a Python object ({what})") from None
    except Exception as error:  # noqa: BLE001 - torch reports damage as EOFError, OSError, KeyError, RuntimeError
        size = path.stat().st_size
        raise _damaged(path, "zero bytes" if size == 0 else
                       f"{size} bytes, unreadable: {type(error).__name__} {str(error)[:200]!r}"
                       ) from None
    if not isinstance(state, dict):
        raise _damaged(path, f"holds a {type(state).__name__}, not an anfast checkpoint")
    return state


def load_training_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
                             mmap: bool = False) -> Dict[str, Any]:
    """``load_checkpoint``, then check it holds everything ``anfast train --resume`` restores."""
    state = load_checkpoint(path, map_location, mmap=mmap)
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise _damaged(Path(path), f"not an anfast training checkpoint: no {missing}")
    return state


def _damaged(path: Path, reason: str) -> CheckpointError:
    previous = previous_checkpoint(path)
    if previous.is_file():
        fix = f"the previous checkpoint is {previous}; restart with --resume {previous} or --overwrite"
    else:
        fix = "there is no previous checkpoint; restart with --overwrite"
    return CheckpointError(f"{path} is damaged ({reason}); {fix}", reason=f"damaged ({reason})")


def _probe(path: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the training checkpoint at ``path``, memory-mapped, None) or (None, why it is none:
    "a dangling symlink to X", "a symlink loop", "a directory", "damaged (...)")."""
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                return None, "a symlink loop"
        return None, f"a dangling symlink to {os.readlink(path)}"
    if path.is_dir():
        return None, "a directory"
    if not path.is_file():
        return None, "not a regular file"
    try:
        return load_training_checkpoint(path, mmap=True), None
    except CheckpointError as error:
        return None, error.reason


def newest_usable_checkpoint(checkpoint_dir: Union[str, Path], candidates: Sequence[str] = RESUME_CANDIDATES
                             ) -> Tuple[Optional[Path], Dict[str, str]]:
    """(the ``candidates`` file of ``checkpoint_dir`` with the most optimizer steps that
    loads, or None; {name: why it is unusable} for every other candidate that exists in
    any form, a dangling symlink included). On a tie the earlier candidate wins: last.pt
    over a best.pt written at the same step. Files are memory-mapped, not read."""
    checkpoint_dir = Path(checkpoint_dir)
    usable, unusable = [], {}
    for order, name in enumerate(candidates):
        path = checkpoint_dir / name
        if not os.path.lexists(path):
            continue
        state, why = _probe(path)
        if state is None:
            unusable[name] = why
        else:
            usable.append(((state["step"], -order), path))
    return (max(usable)[1] if usable else None), unusable


def auto_resume_checkpoint(checkpoint_dir: Union[str, Path]) -> Tuple[Optional[Path], Dict[str, str]]:
    """(the checkpoint ``--resume auto`` continues, or None; {name: why it is unusable} as
    newest_usable_checkpoint gives it). last.pt whenever it loads: it is where the run
    last stopped, even when last.prev.pt or best.pt holds more steps (a run resumed
    from one of them by name, then stopped again); when it does not, the newer usable
    one of last.prev.pt and best.pt."""
    last, unusable = newest_usable_checkpoint(checkpoint_dir, RESUME_CANDIDATES[:1])
    if last is not None:
        return last, unusable
    path, also_unusable = newest_usable_checkpoint(checkpoint_dir, RESUME_CANDIDATES[1:])
    return path, {**unusable, **also_unusable}


def resume_checkpoint(resume: str, run_dir: Union[str, Path]) -> Optional[Path]:
    """The checkpoint ``--resume RESUME`` continues: the file it names or, for "auto",
    auto_resume_checkpoint's of RUN_DIR/checkpoints; None when "auto" finds none in any
    form (the run saved none yet). Raises ConfigError when the file is missing, or when
    "auto" finds candidates and none of them loads: a fresh start would replace that run."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"--resume {resume}: no such checkpoint; pass a .pt file or "
                              f"--resume auto")
        return path
    checkpoint_dir = Path(run_dir) / "checkpoints"
    path, unusable = auto_resume_checkpoint(checkpoint_dir)
    if path is None and unusable:
        found = "; ".join(f"{name} is {why}" for name, why in unusable.items())
        raise ConfigError(f"--resume auto: {checkpoint_dir} holds no usable checkpoint ({found}); "
                          f"restore one of {', '.join(RESUME_CANDIDATES)}, or start the run again "
                          f"with --overwrite (which deletes it)")
    return path


def remove_stale_temp_files(directory: Union[str, Path]) -> None:
    """Delete temp files left by a writer that was killed mid-save."""
    directory = Path(directory)
    if directory.is_dir():
        for temp in directory.glob(f".*{_TEMP_SUFFIX}"):
            temp.unlink(missing_ok=True)


def get_rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states, as tensors."""
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_meta": [numpy_kind, int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)],
        "python_internal": torch.tensor(python_internal, dtype=torch.int64),
        "python_meta": [python_version, python_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_state(checkpoint: Dict[str, Any], rank: int) -> Dict[str, Any]:
    """Rank ``rank``'s RNG states in a training checkpoint, whose "rng" lists one
    ``get_rng_state`` per rank (each rank draws its own dropout masks and noise, seeded
    seed + rank). A checkpoint written before they were kept per rank holds one state,
    rank 0's: every rank takes it (exact for a single-process run, as it always was)."""
    saved = checkpoint["rng"]
    return saved[rank] if isinstance(saved, list) else saved


def checkpoint_world_size(checkpoint: Dict[str, Any]) -> Optional[int]:
    """How many processes trained the run of a training checkpoint (one RNG state each);
    None for an older checkpoint with a single state (see rank_rng_state)."""
    saved = checkpoint["rng"]
    return len(saved) if isinstance(saved, list) else None


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` captured, wherever its tensors were loaded: a resume
    on CUDA loads the checkpoint with map_location=cuda (a --resume run on an H200 failed
    here with "can't convert cuda:0 device type tensor to numpy")."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_kind, numpy_pos, numpy_has_gauss, numpy_gauss = state["numpy_meta"]
    np.random.set_state((numpy_kind, state["numpy_keys"].cpu().numpy().astype(np.uint32), numpy_pos,
                         numpy_has_gauss, numpy_gauss))
    python_version, python_gauss = state["python_meta"]
    random.setstate((python_version, tuple(int(v) for v in state["python_internal"].cpu().tolist()),
                     python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
