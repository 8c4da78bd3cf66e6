"""AdjoinedGlobalResponseNorm: ConvNeXt-V2's GRN whose leading channels serve the students."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from anfast.nn.layernorm import _ChannelNorm
from anfast.nn.mixing import leading_sums

__all__ = ["AdjoinedGlobalResponseNorm"]


class AdjoinedGlobalResponseNorm(_ChannelNorm, nn.Module):
    """Global Response Normalization (ConvNeXt-V2; timm's ``GlobalResponseNorm``) for the
    base, and for each student over its own channels.

    GRN scales each channel by its spatial L2 norm over the mean of those norms across
    the channels: ``x + weight * x * g / (mean_c(g) + eps) + bias``, ``g`` the norm of each
    channel over the spatial axes. The mean runs over the network's own channels, so a
    student normalises by its own, as the exported student (the model's own class with
    the leading slice of ``weight`` and ``bias``) does; a DAN search mixes each width
    choice's GRN of its leading channels (anfast.dan.gates), where a mask's zeros would
    count in the mean and its bias would land in the masked channels.

    ``channels_axis`` is -1 for (N, H, W, C) (timm's ``channels_last=True``) or 1 for
    (N, C, H, W). Call as ``norm(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    """

    _widths_name = "student_channels"

    def __init__(self, num_channels: int, eps: float = 1e-6, *, channels_axis: int = -1,
                 student_channels: Sequence[int] = (), device=None, dtype=None) -> None:
        super().__init__()
        if channels_axis not in (1, -1):
            raise ValueError(f"AdjoinedGlobalResponseNorm: channels_axis={channels_axis}; give -1 (N, H, W, C) "
                             f"or 1 (N, C, H, W)")
        self.num_channels, self.eps, self.channels_axis = num_channels, eps, channels_axis
        self.student_channels = tuple(int(c) for c in student_channels)
        if not all(1 <= c <= num_channels for c in self.student_channels):
            raise ValueError(f"AdjoinedGlobalResponseNorm: student_channels={self.student_channels} must be in "
                             f"[1, {num_channels}] (the base's)")
        self.weight = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))

    @classmethod
    def from_grn(cls, grn: nn.Module, student_channels: Sequence[int]) -> "AdjoinedGlobalResponseNorm":
        """An AdjoinedGlobalResponseNorm that shares timm's ``grn``'s parameters (the same
        Parameter objects), on its layout (``grn.channel_dim``)."""
        module = cls(grn.weight.numel(), grn.eps, channels_axis=1 if grn.channel_dim == 1 else -1,
                     student_channels=student_channels, device="meta")
        module.weight, module.bias = grn.weight, grn.bias
        return module

    def _normalise(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        spatial = (1, 2) if self.channels_axis == -1 else (2, 3)
        shape = (1, 1, 1, -1) if self.channels_axis == -1 else (1, -1, 1, 1)
        norms = x.norm(p=2, dim=spatial, keepdim=True)
        scaled = norms / (norms.mean(dim=self.channels_axis, keepdim=True) + self.eps)
        return x + torch.addcmul(bias.view(shape), weight.view(shape), x * scaled)

    def mix_leading(self, x: torch.Tensor, widths: Sequence[int], gates: torch.Tensor) -> torch.Tensor:
        """sum_k gates[k] * normalise_leading(x, widths[k]), each zero beyond its width (a DAN
        search's student_norm; widths ascending and distinct, one gate each), in one pass
        over x instead of one GRN per width choice.

        In the channels only choices j, j+1, ... have (segment j), the mixture is
        ``x * (H_j + weight * g * S_j) + H_j * bias``, ``g`` each channel's norm,
        ``S_j = sum_{k>=j} gates[k] / (mean of choice k's norms + eps)`` per sample and
        ``H_j = sum_{k>=j} gates[k]``: a multiplier per sample and channel, so one product
        over x, and autograd's backward of it is one more pass."""
        widths = self._check_mix(x, widths, gates)
        channels = x.shape[self.channels_axis]
        spatial = (1, 2) if self.channels_axis == -1 else (2, 3)
        norms = x.norm(p=2, dim=spatial, keepdim=True)  # (N, 1, 1, C) or (N, C, 1, 1)
        per_sample = norms.flatten(1)  # (N, C)
        gates = gates.to(norms.dtype)
        per_choice = gates / (torch.stack([per_sample[:, :width].mean(1) for width in widths], -1) + self.eps)
        shape = (1, 1, 1, -1) if self.channels_axis == -1 else (1, -1, 1, 1)
        share = leading_sums(gates, widths, channels).view(shape)  # H per channel
        inverse_means = leading_sums(per_choice, widths, channels).view(norms.shape)  # S per sample and channel
        multiplier = torch.addcmul(share, self.weight.view(shape) * norms, inverse_means)
        return torch.addcmul(share * self.bias.view(shape), x, multiplier)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, channels_axis={self.channels_axis}, "
                f"student_channels={self.student_channels}")
