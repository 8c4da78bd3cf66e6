"""AdjoinedLinear: a Linear layer whose leading block also serves the students."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anfast.nn.conv import check_student_inputs, check_student_widths
from anfast.nn.streams import hand_over, network_stream

__all__ = ["AdjoinedLinear"]


class AdjoinedLinear(nn.Linear):
    """Linear for the base plus students using ``weight[:out_s, :in_s]`` and ``bias[:out_s]``.

    The classifier keeps every class: its student out width equals the base's
    (DESIGN.md section 1, "Classifier"). After a channel concat the student's input
    features are the base features named by an index.

    Call as ``fc(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    """

    # Set by a DAN search (anfast.dan.gates.StudentMasks): the first student's mask of its
    # output features, student_mask(self) at each forward, multiplied into its weight rows
    # and bias: F.linear(x, w, b) * m is F.linear(x, w * m[:, None], b * m), a product of
    # the weight's size, not of the activation's (ConvNeXt's (N, H, W, 4C) hidden features).
    student_mask: Optional[Callable[[nn.Module], torch.Tensor]] = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        student_in_features: Sequence[int] = (),
        student_out_features: Sequence[int] = (),
        student_in_indices: Sequence[Optional[torch.Tensor]] = (),
        input_shared: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.student_in_features = tuple(int(c) for c in student_in_features)
        self.student_out_features = tuple(int(c) for c in student_out_features)
        check_student_widths(self, ("student_in_features", self.student_in_features, self.in_features),
                             ("student_out_features", self.student_out_features, self.out_features))
        self.input_shared = input_shared
        indices = tuple(student_in_indices) or (None,) * len(self.student_out_features)
        for s, index in enumerate(indices):
            self.register_buffer(f"_student_index_{s}", index, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **student_kwargs) -> "AdjoinedLinear":
        """An AdjoinedLinear that shares ``linear``'s parameters (the same Parameter objects)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device="meta", **student_kwargs)
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def network_weight(self, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) of network n: 0 is the base, s + 1 is student s."""
        if n == 0:
            return self.weight, self.bias
        out_features = self.student_out_features[n - 1]
        index = getattr(self, f"_student_index_{n - 1}")
        weight = self.weight[:out_features]
        weight = weight.index_select(1, index) if index is not None \
            else weight[:, : self.student_in_features[n - 1]]
        return weight, None if self.bias is None else self.bias[:out_features]

    def forward(self, x_base: torch.Tensor, *x_students: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_shared:
            y_base = F.linear(x_base, self.weight, self.bias)
            y_students = [hand_over(y_base[..., :c], s + 1) for s, c in enumerate(self.student_out_features)]
            if self.student_mask is not None:
                # A masked student computes by itself: its mask's gradient would read the
                # base's output, which an in-place op of the base may overwrite.
                y_students[0] = self._linear_on_stream(1, x_base)
            return (y_base, *y_students)
        check_student_inputs(self, x_students, "student_in_features", self.student_in_features, axis=-1)
        return (F.linear(x_base, self.weight, self.bias),
                *(self._linear_on_stream(s + 1, x) for s, x in enumerate(x_students)))

    def _linear_on_stream(self, n: int, x: torch.Tensor) -> torch.Tensor:
        with network_stream(n):
            weight, bias = self.network_weight(n)
            if n == 1 and self.student_mask is not None:
                mask = self.student_mask(self).to(weight.dtype)
                weight, bias = weight * mask[:, None], None if bias is None else bias * mask
            return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, student_in_features={self.student_in_features}, "
                f"student_out_features={self.student_out_features}")
