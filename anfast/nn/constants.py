"""``device_constants``: tensors built from host values once per arguments, so that a
step on a GPU makes no synchronising host-to-device copy for them."""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["device_constants"]


def device_constants(make: Callable, *args):
    """``make(*args)``, tensors built from host values, made once per arguments: such a
    tensor is a synchronising copy on a GPU, which a search step must not make (traced,
    they are the graph's constants, made in the trace)."""
    if torch.compiler.is_compiling():
        return make(*args)
    return _cached_constants(make, *args)


_cached_constants = functools.lru_cache(maxsize=1024)(lambda make, *args: make(*args))
