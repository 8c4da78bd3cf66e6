"""AdjoinedBatchNorm2d (and -1d): private normalisation for the base and every student."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from anfast.nn.conv import check_student_inputs
from anfast.nn.streams import network_stream

__all__ = ["AdjoinedBatchNorm2d", "AdjoinedBatchNorm1d", "AdjoinedSyncBatchNorm2d", "AdjoinedSyncBatchNorm1d",
           "convert_sync_batchnorm"]


class AdjoinedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d for the base plus one private BatchNorm2d per student.

    The networks' statistics differ, so each keeps its own running statistics (as in
    the paper and Slimmable Networks). With ``share_affine`` the students use the
    leading (or indexed) slice of the base's affine parameters and keep only their
    own running statistics. The base keeps nn.BatchNorm2d's parameter names; student
    ``s`` lives under ``student_norms.{s}``.

    Call as ``bn(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    """

    norm_class = nn.BatchNorm2d  # the students' class, and the plain layer an export writes
    # Set by a DAN search (anfast.dan.gates.StudentMasks): the first student's channel mask,
    # student_mask(self) at each forward, multiplied into its affine parameters: bn(x) * m
    # is one norm with weight * m and bias * m, so the mask costs no product over the
    # activation and its gradient no reduction over it. Called with the layer, as
    # AdjoinedConv2d.student_filters is.
    student_mask: Optional[Callable[[nn.Module], torch.Tensor]] = None

    def __init__(
        self,
        num_features: int,
        *args,
        student_features: Sequence[int] = (),
        student_indices: Sequence[Optional[torch.Tensor]] = (),
        share_affine: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.share_affine = share_affine and self.affine
        self.student_norms = nn.ModuleList(
            self.norm_class(c, self.eps, self.momentum, affine=self.affine and not self.share_affine,
                           track_running_stats=self.track_running_stats,
                           device=kwargs.get("device"), dtype=kwargs.get("dtype"))
            for c in student_features
        )
        indices = tuple(student_indices) or (None,) * len(student_features)
        for s, index in enumerate(indices):
            self.register_buffer(f"_student_index_{s}", index, persistent=False)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, student_features: Sequence[int],
                       student_indices: Sequence[Optional[torch.Tensor]] = (),
                       share_affine: bool = False) -> "AdjoinedBatchNorm2d":
        """Adopt ``bn`` as the base norm; students start from the matching slice of it.
        Call on AdjoinedBatchNorm1d for a BatchNorm1d."""
        # Students follow bn's tensors: its affine parameters, else its running statistics
        # (track_running_stats=False has none); a norm with neither holds no tensor to follow.
        held = bn.weight if bn.affine else bn.running_mean
        placement = {} if held is None else dict(device=held.device, dtype=held.dtype)
        module = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                     student_features=student_features, student_indices=student_indices,
                     share_affine=share_affine, **placement)
        module.load_state_dict(bn.state_dict(), strict=False)  # students are filled below
        if bn.affine:
            module.weight, module.bias = bn.weight, bn.bias  # the same Parameter objects
        module.copy_base_to_students()
        return module

    @torch.no_grad()
    def copy_base_to_students(self) -> None:
        """Set every student's norm (affine and running statistics) to its slice of the base's."""
        for s, norm in enumerate(self.student_norms):
            for name, tensor in norm.state_dict().items():
                if name != "num_batches_tracked":
                    tensor.copy_(self._student_slice(getattr(self, name), s))

    def _student_slice(self, tensor: torch.Tensor, s: int) -> torch.Tensor:
        index = getattr(self, f"_student_index_{s}")
        if index is not None:
            return tensor.index_select(0, index)
        return tensor[: self.student_norms[s].num_features]

    def forward(self, x_base: torch.Tensor, *x_students: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_student_inputs(self, x_students, "student_features",
                             tuple(norm.num_features for norm in self.student_norms), axis=1)
        outputs = [super().forward(x_base)]
        for s, (norm, x) in enumerate(zip(self.student_norms, x_students)):
            with network_stream(s + 1):
                outputs.append(self._student_forward(s, norm, x))
        return tuple(outputs)

    def _student_forward(self, s: int, norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        mask = self.student_mask(self) if s == 0 and self.student_mask is not None else None
        if mask is None and not self.share_affine:
            return norm(x)
        # Private running statistics, lent affine parameters (the base's slice, or the
        # student's own times its mask): the student's own forward runs with them, so after
        # convert_sync_batchnorm it syncs its statistics.
        if self.share_affine:
            weight, bias = self._student_slice(self.weight, s), self._student_slice(self.bias, s)
        else:
            weight, bias = norm.weight, norm.bias
        if mask is not None:
            mask = mask.to(x.dtype if weight is None else weight.dtype)
            weight = mask if weight is None else weight * mask
            bias = None if bias is None else bias * mask
        affine = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return torch.func.functional_call(norm, affine, (x,))

    def extra_repr(self) -> str:
        features = tuple(n.num_features for n in self.student_norms)
        return f"{super().extra_repr()}, student_features={features}, share_affine={self.share_affine}"


class AdjoinedBatchNorm1d(AdjoinedBatchNorm2d):
    """AdjoinedBatchNorm2d for a BatchNorm1d's (N, C) or (N, C, L) inputs (RepViT's head):
    the same private statistics per network, BatchNorm1d students."""

    norm_class = nn.BatchNorm1d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        nn.BatchNorm1d._check_input_dim(self, input)


class AdjoinedSyncBatchNorm2d(AdjoinedBatchNorm2d, nn.SyncBatchNorm):
    """AdjoinedBatchNorm2d whose base and students use statistics across torchrun ranks.

    Method order puts nn.SyncBatchNorm.forward behind ``super().forward`` of the base
    norm; the students are plain nn.SyncBatchNorm modules. Made by
    :func:`convert_sync_batchnorm`, never constructed directly.
    """


class AdjoinedSyncBatchNorm1d(AdjoinedBatchNorm1d, nn.SyncBatchNorm):
    """AdjoinedBatchNorm1d whose base and students use statistics across torchrun ranks."""


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """SyncBatchNorm for every adjoined norm of ``module``, in place; returns ``module``.

    torch.nn.SyncBatchNorm.convert_sync_batchnorm would replace an adjoined norm by a
    plain SyncBatchNorm and drop its students, so adjoined networks use this instead.
    """
    synced = {AdjoinedBatchNorm2d: AdjoinedSyncBatchNorm2d, AdjoinedBatchNorm1d: AdjoinedSyncBatchNorm1d}
    for norm in module.modules():
        if type(norm) in synced:
            norm.__class__ = synced[type(norm)]
            norm.process_group = process_group
            norm.student_norms = nn.SyncBatchNorm.convert_sync_batchnorm(norm.student_norms, process_group)
    return module
