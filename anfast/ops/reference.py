"""The pure-torch reference of the adjoined convolution.

This is the single source of truth for the op's numbers: the CPU path, the test
oracle of every kernel and the baseline of every benchmark import it.

Contract (DESIGN.md section 1 and 4): one weight W[C_out, C_in / groups, kh, kw];
the base computes conv(x_b, W); the student computes conv(x_s, W_s) with

    W_s = W[:out_student, :in_per_group_student]   (prefix channel map)
    W_s = W[:out_student][:, student_in_index]     (gathered map, groups == 1)

and student_groups = out_student / (C_out / groups) whole groups (depthwise:
groups == C_in == C_out keeps the leading c channels with groups = c).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "student_groups",
    "student_weight",
    "adjoined_conv2d_reference",
    "adjoined_conv2d_backward_reference",
]


def student_groups(weight: torch.Tensor, groups: int, out_student: int) -> int:
    """Number of conv groups the student keeps: whole leading groups of the base."""
    if groups == 1:
        return 1
    out_per_group = weight.shape[0] // groups
    if out_student % out_per_group:
        raise ValueError(
            f"out_student={out_student} is not a whole number of groups of {out_per_group} "
            f"output channels (groups={groups}); round the student width to a multiple of {out_per_group}"
        )
    return out_student // out_per_group


def student_weight(
    weight: torch.Tensor,
    in_student: int,
    out_student: int,
    groups: int = 1,
    student_in_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The student's slice (or gather) of the shared weight, as a view where possible."""
    if student_in_index is not None:
        return weight[:out_student].index_select(1, student_in_index)
    if groups == 1:
        return weight[:out_student, :in_student]
    return weight[:out_student]


def _pairs(value: Sequence[int] | int) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def adjoined_conv2d_reference(
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_student: int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    student_in_index: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and student convolutions of the shared weight, with plain F.conv2d."""
    stride, padding, dilation = _pairs(stride), _pairs(padding), _pairs(dilation)
    y_base = F.conv2d(x_base, weight, bias, stride, padding, dilation, groups)
    g_s = student_groups(weight, groups, out_student)
    w_s = student_weight(weight, x_student.shape[1], out_student, groups, student_in_index)
    b_s = None if bias is None else bias[:out_student]
    y_student = F.conv2d(x_student, w_s, b_s, stride, padding, dilation, g_s)
    return y_base, y_student


def adjoined_conv2d_backward_reference(
    grad_base: torch.Tensor,
    grad_student: torch.Tensor,
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    out_student: int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    student_in_index: Optional[torch.Tensor] = None,
    output_mask: Sequence[bool] = (True, True, True, True),
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients (dx_base, dx_student, dweight, dbias) of the adjoined convolution.

    The student's weight gradient lands in the leading block of the one shared
    gradient, as the fused kernels do (DESIGN.md section 4, wgrad).
    """
    stride, padding, dilation = _pairs(stride), _pairs(padding), _pairs(dilation)
    need_dx_b, need_dx_s, need_dw, need_db = output_mask
    bias_sizes = [weight.shape[0]] if has_bias else None
    dx_b, dw, db = torch.ops.aten.convolution_backward(
        grad_base, x_base, weight, bias_sizes, stride, padding, dilation,
        False, [0, 0], groups, [need_dx_b, need_dw, need_db and has_bias],
    )
    g_s = student_groups(weight, groups, out_student)
    w_s = student_weight(weight, x_student.shape[1], out_student, groups, student_in_index)
    dx_s, dw_s, db_s = torch.ops.aten.convolution_backward(
        grad_student, x_student, w_s, [out_student] if has_bias else None, stride, padding,
        dilation, False, [0, 0], g_s, [need_dx_s, need_dw, need_db and has_bias],
    )
    if need_dw:
        dw = dw.clone() if dw._base is not None else dw
        if student_in_index is not None:
            dw[:out_student].index_add_(1, student_in_index, dw_s)
        elif groups == 1:
            dw[:out_student, : x_student.shape[1]] += dw_s
        else:
            dw[:out_student] += dw_s
    if need_db and has_bias:
        db = db.clone()
        db[:out_student] += db_s
    else:
        db = None
    return (dx_b if need_dx_b else None, dx_s if need_dx_s else None, dw if need_dw else None, db)
