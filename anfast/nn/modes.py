"""``eval_mode``: a module in eval mode for a block, every submodule's own mode back after it."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; after it (also after an error) every
    submodule is back in its own mode. ``module.train(was_training)`` would put them all
    in the top module's: a BatchNorm frozen in eval inside a training network would train."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
