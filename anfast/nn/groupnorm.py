"""AdjoinedGroupNorm: a GroupNorm whose leading channels serve the students, each normalising its own."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anfast.nn.layernorm import _ChannelNorm

__all__ = ["AdjoinedGroupNorm"]


class AdjoinedGroupNorm(_ChannelNorm, nn.GroupNorm):
    """GroupNorm for the base, and for each student over its own channels in as many groups.

    The exported student is the model's own class with a narrower norm,
    ``GroupNorm(num_groups, C_student)``, as the model's constructor builds it at that
    width: each student width is a whole number of groups (adjoin rounds it so), and a
    student's group holds ``C_student / num_groups`` of its channels. A GroupNorm keeps no
    running statistics, so the students use the leading slice of the base's affine
    parameters, as convs use the leading slice of their weight.

    Call as ``norm(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    """

    _widths_name = "student_channels"
    channels_axis = 1

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 student_channels: Sequence[int] = (), device=None, dtype=None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.student_channels = tuple(int(c) for c in student_channels)
        if not all(1 <= c <= num_channels and c % num_groups == 0 for c in self.student_channels):
            raise ValueError(f"AdjoinedGroupNorm: student_channels={self.student_channels} must be multiples of "
                             f"num_groups={num_groups} in [1, {num_channels}] (the base's)")

    @classmethod
    def from_groupnorm(cls, norm: nn.GroupNorm, student_channels: Sequence[int]) -> "AdjoinedGroupNorm":
        """An AdjoinedGroupNorm that shares ``norm``'s parameters (the same Parameter objects)."""
        module = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, student_channels=student_channels,
                     device="meta")
        module.weight, module.bias = norm.weight, norm.bias
        return module

    def _normalise(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, student_channels={self.student_channels}"
