"""StudentReduction: the first student's op over its own channels, as a layer a DAN search can set."""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

__all__ = ["SHIFTING_OPS", "StudentReduction"]


class StudentReduction(nn.Module):
    """An op that reduces or mixes the first student's channels on axis 1 (CBAM's
    ``x.mean(1, keepdim=True)`` and ``x.amax(1, keepdim=True)`` or ``torch.max(x, 1)``, a
    softmax along them), or that shifts them by a number or a tensor equal in every
    network (StarReLU's learnable scalar bias: ``x + b``), called as the model calls it:
    ``op(x, *args, **kwargs)``, or ``x.op(*args, **kwargs)`` for a method. adjoin puts one in the first student's graph for each such op on a
    group that can shrink (``AdjoinedNetwork.channel_reductions``); it has no state.

    A DAN search masks channels to zero at full width, where they would still count in a
    mean (or win a max over negative values, or take the shift); it sets ``student_reduce``, which computes
    the gates' mix of each width choice's op on its leading channels instead (anfast.dan.gates;
    for a shift, ``shifts``, that is the op times the group's channel mask).

    ``keeps_channels``: the op keeps the channel axis at its size (a softmax, a shift),
    rather than reducing it away or to one.
    """

    # Set by a DAN search: student_reduce(self, x, *args, **kwargs), called in place of the op.
    student_reduce: Optional[Callable[..., torch.Tensor]] = None

    def __init__(self, op: Union[str, Callable], keeps_channels: bool) -> None:
        super().__init__()
        self.op, self.keeps_channels = op, keeps_channels

    @property
    def shifts(self) -> bool:
        """Whether the op shifts x (adds or subtracts what adjoin found equal along the
        channels): then each width choice's op on its leading channels, zero beyond, is the
        op on all of them times 1[c < width], and their gates' mix is the op times the
        group's channel mask."""
        try:
            return self.keeps_channels and self.op in SHIFTING_OPS
        except TypeError:  # an unhashable callable object
            return False

    def apply_op(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The op on ``x`` as the model computes it."""
        return getattr(x, self.op)(*args, **kwargs) if isinstance(self.op, str) else self.op(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.student_reduce is not None:
            return self.student_reduce(self, x, *args, **kwargs)
        return self.apply_op(x, *args, **kwargs)

    def extra_repr(self) -> str:
        name = self.op if isinstance(self.op, str) else f"{getattr(self.op, '__module__', '')}.{self.op.__name__}"
        return f"{name}, keeps_channels={self.keeps_channels}"


# Ops that shift a map by a number or a tensor equal in every network (StarReLU's and
# HGNetV2's learnable scalar bias), which adjoin makes StudentReductions where a DAN mask
# would leave the shift in zeroed channels.
SHIFTING_OPS = frozenset({operator.add, torch.add, "add", operator.sub, torch.sub, "sub"})
