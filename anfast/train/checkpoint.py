"""Checkpoints that survive kill -9 and load with ``torch.load(weights_only=True)``.

A checkpoint is written to a temp file in the same directory, flushed and fsynced,
then renamed over the old one with os.replace (atomic on POSIX), and the directory
is fsynced so the rename itself is durable. A reader therefore sees the old file or
the new one, never half of one. Only tensors and plain Python values go in, so
loading never unpickles arbitrary objects; RNG states are stored as tensors.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state",
           "remove_stale_temp_files"]

_TEMP_SUFFIX = ".tmp"


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """Atomically write ``state`` to ``path`` (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                     suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu"
                    ) -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``, tensors and plain values only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint file, or "
                                f"--resume auto to start fresh when there is none")
    return torch.load(path, map_location=map_location, weights_only=True)


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


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` captured."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_kind, numpy_pos, numpy_has_gauss, numpy_gauss = state["numpy_meta"]
    np.random.set_state((numpy_kind, state["numpy_keys"].numpy().astype(np.uint32), numpy_pos,
                         numpy_has_gauss, numpy_gauss))
    python_version, python_gauss = state["python_meta"]
    random.setstate((python_version, tuple(int(v) for v in state["python_internal"].tolist()),
                     python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
