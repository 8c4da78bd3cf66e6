"""Fused adjoined convolution, input gradients: dX_base and dX_student in one launch.

dX[b, c, h, w] = sum over (kh, kw, o) of dY[b, o, oh, ow] * W[o, c, kh, kw], where
oh * stride_h - pad_h + kh = h. Implicit GEMM with rows m over N * H * W input
positions, columns over input channels c and the reduction over (kh, kw, o). For
stride > 1 this is a transposed conv; each (kh, kw) tap contributes only where
h + pad_h - kh divides by the stride, which the row mask expresses (correct for every
stride; the taps that never match cost a masked load, not a wrong number).

A tile whose channels start below the student's input width also accumulates
dX_student = dY_student (x) W[:out_student, :in_student]^T with the same W tile.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from anfast.triton.forward import decode_rows, dot_options, grouped_tile
from anfast.triton.tuning import autotuned

__all__ = ["adjoined_conv2d_dgrad"]


@triton.jit
def _adjoined_conv_dgrad_kernel(
    grad_base_ptr, grad_student_ptr, weight_ptr, dx_base_ptr, dx_student_ptr,
    # strides in (n, c, h, w) order for activations, (out, in, kh, kw) for the weight
    grad_base_stride_n, grad_base_stride_c, grad_base_stride_h, grad_base_stride_w,
    grad_student_stride_n, grad_student_stride_c, grad_student_stride_h, grad_student_stride_w,
    weight_stride_o, weight_stride_i, weight_stride_h, weight_stride_w,
    dx_base_stride_n, dx_base_stride_c, dx_base_stride_h, dx_base_stride_w,
    dx_student_stride_n, dx_student_stride_c, dx_student_stride_h, dx_student_stride_w,
    # sizes: base channels C_*, student channels C_*_S (leading prefix)
    BATCH, H, W, C_IN, C_IN_S, H_OUT, W_OUT, C_OUT, C_OUT_S,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
    COMPUTE_BASE: tl.constexpr,     # write dX_base (output_mask[0])
    COMPUTE_STUDENT: tl.constexpr,  # write dX_student (output_mask[1])
    DOT_DTYPE: tl.constexpr,        # see forward.dot_options
    DOT_PRECISION: tl.constexpr,    # see forward.dot_options
    BLOCK_M: tl.constexpr,          # input positions per tile
    BLOCK_N: tl.constexpr,          # input channels per tile
    BLOCK_K: tl.constexpr,          # output channels per reduction step
    GROUP_M: tl.constexpr,          # m tiles that walk the channel tiles together
):
    M = BATCH * H * W
    if COMPUTE_BASE:
        channels = C_IN
        reduce_channels = C_OUT
    else:
        # Only the student asked for: its channels and its output channels bound the work.
        channels = C_IN_S
        reduce_channels = C_OUT_S
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(channels, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    c_mask = offs_c < C_IN
    image, in_h, in_w = decode_rows(offs_m, H, W)
    with_student = (pid_n * BLOCK_N < C_IN_S) & COMPUTE_STUDENT

    acc_base = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_student = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for khw in range(0, KH * KW):
        kh = khw // KW
        kw = khw % KW
        out_h_scaled = in_h + PAD_H - kh
        out_w_scaled = in_w + PAD_W - kw
        out_h = out_h_scaled // STRIDE_H
        out_w = out_w_scaled // STRIDE_W
        # The ">= 0" tests come first: for negative numbers only the mask matters.
        row_ok = (m_mask & (out_h_scaled >= 0) & (out_w_scaled >= 0)
                  & (out_h * STRIDE_H == out_h_scaled) & (out_w * STRIDE_W == out_w_scaled)
                  & (out_h < H_OUT) & (out_w < W_OUT))
        grad_base_rows = (grad_base_ptr + image * grad_base_stride_n + out_h * grad_base_stride_h
                          + out_w * grad_base_stride_w)
        grad_student_rows = (grad_student_ptr + image * grad_student_stride_n
                             + out_h * grad_student_stride_h + out_w * grad_student_stride_w)
        weight_cols = weight_ptr + offs_c * weight_stride_i + kh * weight_stride_h + kw * weight_stride_w
        for o0 in range(0, reduce_channels, BLOCK_K):
            out_chan = o0 + offs_k
            w_tile = tl.load(weight_cols[None, :] + out_chan[:, None] * weight_stride_o,
                             mask=(out_chan[:, None] < C_OUT) & c_mask[None, :], other=0.0)
            if COMPUTE_BASE:
                g_tile = tl.load(grad_base_rows[:, None] + out_chan[None, :] * grad_base_stride_c,
                                 mask=row_ok[:, None] & (out_chan[None, :] < C_OUT), other=0.0)
                acc_base = tl.dot(g_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc_base,
                                  input_precision=DOT_PRECISION)
            if with_student & (o0 < C_OUT_S):
                # Same W tile; output channels past the student's width load zeros.
                gs_tile = tl.load(grad_student_rows[:, None] + out_chan[None, :] * grad_student_stride_c,
                                  mask=row_ok[:, None] & (out_chan[None, :] < C_OUT_S), other=0.0)
                acc_student = tl.dot(gs_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc_student,
                                     input_precision=DOT_PRECISION)

    if COMPUTE_BASE:
        dx_base_rows = (dx_base_ptr + image * dx_base_stride_n + in_h * dx_base_stride_h
                        + in_w * dx_base_stride_w)
        tl.store(dx_base_rows[:, None] + offs_c[None, :] * dx_base_stride_c,
                 acc_base.to(dx_base_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
    if with_student:
        dx_student_rows = (dx_student_ptr + image * dx_student_stride_n + in_h * dx_student_stride_h
                           + in_w * dx_student_stride_w)
        tl.store(dx_student_rows[:, None] + offs_c[None, :] * dx_student_stride_c,
                 acc_student.to(dx_student_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_c[None, :] < C_IN_S))


def adjoined_conv2d_dgrad(
    grad_base: torch.Tensor,
    grad_student: torch.Tensor,
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    need_base: bool = True,
    need_student: bool = True,
    out: Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx_base, dx_student); a gradient not asked for is None and is not computed.

    ``out`` optionally gives the tensors to write (tests poison them first); by
    default each has its input's shape and memory format, as F.conv2d's backward.
    """
    if not (need_base or need_student):
        return None, None
    batch, c_in, height, width = x_base.shape
    c_out, _, kh, kw = weight.shape
    c_in_student, out_student = x_student.shape[1], grad_student.shape[1]
    h_out, w_out = grad_base.shape[2:]
    if out is None:
        out = (torch.empty_like(x_base) if need_base else None,
               torch.empty_like(x_student) if need_student else None)
    dx_base, dx_student = out
    m_rows = batch * height * width
    channels = c_in if need_base else c_in_student

    def grid(meta):
        return (triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(channels, meta["BLOCK_N"]),)

    # A gradient not asked for gets a stand-in pointer that is never written.
    dx_base_arg = dx_base if need_base else dx_student
    dx_student_arg = dx_student if need_student else dx_base
    launch = autotuned(_adjoined_conv_dgrad_kernel, "dgrad", x_base.device)
    launch(
        grid,
        grad_base, grad_student, weight, dx_base_arg, dx_student_arg,
        *grad_base.stride(), *grad_student.stride(), *weight.stride(), *dx_base_arg.stride(),
        *dx_student_arg.stride(),
        batch, height, width, c_in, c_in_student, h_out, w_out, c_out, out_student,
        stride[0], stride[1], padding[0], padding[1], kh, kw,
        COMPUTE_BASE=need_base, COMPUTE_STUDENT=need_student,
        **dot_options(_adjoined_conv_dgrad_kernel, x_base.dtype),
    )
    return dx_base, dx_student
