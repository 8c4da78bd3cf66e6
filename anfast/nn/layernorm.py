"""AdjoinedLayerNorm: a LayerNorm over the channels whose leading slice serves the students."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anfast.nn.conv import check_student_inputs
from anfast.nn.mixing import check_mix_widths, mixed_layer_norm
from anfast.nn.streams import network_stream

__all__ = ["AdjoinedLayerNorm"]


class _ChannelNorm:
    """A norm without running statistics, for adjoined layers: each network normalises its
    own channels with the leading slice of the base's affine parameters; the students'
    widths are the attribute ``_widths_name`` names, on ``channels_axis``. A subclass
    defines ``_normalise(x, weight, bias)``, the norm of all of x's channels, and
    ``mix_leading(x, widths, gates)``, a DAN search's student norm: the gates' sum of
    each width's ``normalise_leading``, zero beyond it, in one pass over x."""

    _widths_name: str
    channels_axis: int
    # Set by a DAN search (anfast.dan.gates.StudentMasks): the first student's norm of its
    # input x, student_norm(self, x), in place of its own (the gates' mix of each width
    # choice's norm). Called with the layer, so a copy of the network computes with its own.
    student_norm: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None

    def network_affine(self, n: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(weight, bias) of network n, None where the norm has none: 0 is the base, s + 1 is student s."""
        if n == 0:
            return self.weight, self.bias
        return self._leading_affine(getattr(self, self._widths_name)[n - 1])

    def _leading_affine(self, width: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return tuple(None if p is None else p[:width] for p in (self.weight, self.bias))

    def normalise_leading(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The norm of x's leading ``width`` channels as a network of that width computes it:
        statistics over those channels alone, the leading slice of the affine parameters.
        A DAN search mixes these over its width choices (``mix_leading``, tested against this)."""
        x = x.narrow(self.channels_axis, 0, width)
        return self._normalise(x, *self._leading_affine(width))

    def _check_mix(self, x: torch.Tensor, widths: Sequence[int], gates: torch.Tensor,
                   multiple: int = 1, what: str = "") -> tuple[int, ...]:
        """``widths`` as ints, after checking them against x and the gates for mix_leading."""
        return check_mix_widths(f"{type(self).__name__}.mix_leading", widths, x.shape[self.channels_axis], gates,
                                multiple, what)

    def forward(self, x_base: torch.Tensor, *x_students: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_student_inputs(self, x_students, self._widths_name, getattr(self, self._widths_name),
                             axis=self.channels_axis)
        outputs = [self._normalise(x_base, *self.network_affine(0))]
        for s, x in enumerate(x_students):
            with network_stream(s + 1):
                outputs.append(self.student_norm(self, x) if s == 0 and self.student_norm is not None
                               else self._normalise(x, *self.network_affine(s + 1)))
        return tuple(outputs)


class AdjoinedLayerNorm(_ChannelNorm, nn.LayerNorm):
    """LayerNorm over the channels for the base, and for each student over its own.

    Each network normalises its own channels, as the exported student (the model's own
    class with a narrower norm) does. A LayerNorm keeps no running statistics, so the
    students use the leading slice of the base's affine parameters, as convs use the
    leading slice of their weight. ``channels_axis`` is -1 for a norm over the last axis
    (ConvNeXt's blocks on (N, H, W, C), timm's LayerNorm) or 1 for one over axis 1 of
    (N, C, H, W) (timm's LayerNorm2d).

    Call as ``norm(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    """

    _widths_name = "student_features"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        student_features: Sequence[int] = (),
        channels_axis: int = -1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if channels_axis not in (1, -1):
            raise ValueError(f"AdjoinedLayerNorm: channels_axis={channels_axis}; give -1 (N, ..., C) or 1 (N, C, H, W)")
        self.student_features = tuple(int(c) for c in student_features)
        if not all(1 <= c <= num_features for c in self.student_features):
            raise ValueError(f"AdjoinedLayerNorm: student_features={self.student_features} must be in "
                             f"[1, {num_features}] (the base's)")
        self.channels_axis = channels_axis

    @classmethod
    def from_layernorm(cls, norm: nn.LayerNorm, student_features: Sequence[int],
                       channels_axis: int = -1) -> "AdjoinedLayerNorm":
        """An AdjoinedLayerNorm that shares ``norm``'s parameters (the same Parameter objects)."""
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"AdjoinedLayerNorm: {type(norm).__name__} normalises over "
                             f"{tuple(norm.normalized_shape)}; anfast adjoins norms over the channels alone")
        module = cls(norm.normalized_shape[0], norm.eps, norm.elementwise_affine, norm.bias is not None,
                     student_features=student_features, channels_axis=channels_axis, device="meta")
        module.weight, module.bias = norm.weight, norm.bias
        return module

    def _normalise(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.channels_axis == 1:  # as timm's LayerNorm2d: over the channels of (N, C, H, W)
            return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, self.eps).permute(0, 3, 1, 2)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def mix_leading(self, x: torch.Tensor, widths: Sequence[int], gates: torch.Tensor) -> torch.Tensor:
        """sum_k gates[k] * normalise_leading(x, widths[k]), each zero beyond its width (a DAN
        search's student_norm; widths ascending and distinct, one gate each), in one pass
        over x's channels instead of one norm per width choice: see anfast.nn.mixing."""
        widths = self._check_mix(x, widths, gates)
        return mixed_layer_norm(x, gates, self.weight, self.bias, widths, self.eps, self.channels_axis)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, student_features={self.student_features}, "
                f"channels_axis={self.channels_axis}")
