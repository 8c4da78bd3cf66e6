"""``profile``: parameters and FLOPs of a module, counted by torch.utils.flop_counter."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anfast.nn.modes import eval_mode

__all__ = ["profile", "count_parameters"]


def count_parameters(module: nn.Module, exclude: Sequence[str] = ()) -> int:
    """Number of parameters, each shared tensor counted once, skipping names under ``exclude``."""
    return sum(
        p.numel() for name, p in module.named_parameters()
        if not any(name == e or name.startswith(e + ".") for e in exclude)
    )


def profile(module: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """{"params": int, "flops": int} of one forward pass in eval mode.

    ``input_size`` is (C, H, W) or (N, C, H, W); FLOPs follow torch.utils.flop_counter,
    which counts a multiply-add as 2 FLOPs (so ResNet-50 at 224 px is ~8.2 GFLOPs, the
    "4.1 GFLOPs" of most papers being multiply-adds).
    """
    size = tuple(input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4:
        raise ValueError(f"input_size={input_size!r}: give (C, H, W) or (N, C, H, W)")
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        module(torch.zeros(size, device=device, dtype=dtype))
    return {"params": count_parameters(module), "flops": int(counter.get_total_flops())}
