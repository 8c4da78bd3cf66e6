"""Fused adjoined convolution, forward: base and student outputs in one launch.

Implicit GEMM (DESIGN.md section 4). Rows m run over N * H_out * W_out output
positions, columns n over output channels, and the reduction k over
(kh, kw, input channel). A program owns one (BLOCK_M x BLOCK_N) tile of the base
output; when its channels start below out_student it also owns the same tile of the
student output, and every W tile it loads feeds both dots ("the student reuses the
leading output-channel tiles"). Tiles past out_student run the base alone.

Activations are addressed through their strides, so NHWC (channels_last, where a
K step reads BLOCK_K contiguous channels) and NCHW both work.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

from anfast.triton.tuning import autotuned, is_interpreted

__all__ = ["adjoined_conv2d_forward", "conv_output_like", "dot_options"]


@triton.jit
def grouped_tile(pid, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """(m tile, n tile) of program ``pid`` in grouped order (Triton tutorial 03): GROUP_M
    row tiles walk the column tiles together, so each W tile is reused from L2."""
    tiles_per_group = GROUP_M * num_n_tiles
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
    return first_m + (pid % tiles_per_group) % group_rows, (pid % tiles_per_group) // group_rows


@triton.jit
def decode_rows(offs_m, rows, cols):
    """GEMM rows m as (image, y, x) over a batch x rows x cols grid (NHW order)."""
    return (offs_m // (cols * rows)).to(tl.int64), (offs_m // cols) % rows, offs_m % cols


@triton.jit
def _adjoined_conv_fwd_kernel(
    x_base_ptr, x_student_ptr, weight_ptr, bias_ptr, y_base_ptr, y_student_ptr,
    # strides in (n, c, h, w) order for activations, (out, in, kh, kw) for the weight
    x_base_stride_n, x_base_stride_c, x_base_stride_h, x_base_stride_w,
    x_student_stride_n, x_student_stride_c, x_student_stride_h, x_student_stride_w,
    weight_stride_o, weight_stride_i, weight_stride_h, weight_stride_w,
    y_base_stride_n, y_base_stride_c, y_base_stride_h, y_base_stride_w,
    y_student_stride_n, y_student_stride_c, y_student_stride_h, y_student_stride_w,
    # sizes: base channels C_*, student channels C_*_S (leading prefix)
    BATCH, H, W, C_IN, C_IN_S, H_OUT, W_OUT, C_OUT, C_OUT_S,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
    HAS_BIAS: tl.constexpr,       # add bias (the student adds bias[:C_OUT_S])
    DOT_DTYPE: tl.constexpr,      # see dot_options
    DOT_PRECISION: tl.constexpr,  # see dot_options
    BLOCK_M: tl.constexpr,        # output positions per tile
    BLOCK_N: tl.constexpr,        # output channels per tile
    BLOCK_K: tl.constexpr,        # input channels per reduction step
    GROUP_M: tl.constexpr,        # m tiles that walk the n tiles together (L2 reuse of W)
):
    M = BATCH * H_OUT * W_OUT
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(C_OUT, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C_OUT
    image, out_h, out_w = decode_rows(offs_m, H_OUT, W_OUT)
    in_h0 = out_h * STRIDE_H - PAD_H
    in_w0 = out_w * STRIDE_W - PAD_W
    with_student = pid_n * BLOCK_N < C_OUT_S

    acc_base = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_student = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for khw in range(0, KH * KW):
        kh = khw // KW
        kw = khw % KW
        in_h = in_h0 + kh
        in_w = in_w0 + kw
        # Rows whose receptive-field tap falls in the zero padding load zeros.
        row_ok = m_mask & (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
        x_base_rows = x_base_ptr + image * x_base_stride_n + in_h * x_base_stride_h + in_w * x_base_stride_w
        x_student_rows = (x_student_ptr + image * x_student_stride_n + in_h * x_student_stride_h
                          + in_w * x_student_stride_w)
        weight_cols = weight_ptr + offs_n * weight_stride_o + kh * weight_stride_h + kw * weight_stride_w
        for c0 in range(0, C_IN, BLOCK_K):
            chan = c0 + offs_k
            w_tile = tl.load(weight_cols[None, :] + chan[:, None] * weight_stride_i,
                             mask=(chan[:, None] < C_IN) & n_mask[None, :], other=0.0)
            x_tile = tl.load(x_base_rows[:, None] + chan[None, :] * x_base_stride_c,
                             mask=row_ok[:, None] & (chan[None, :] < C_IN), other=0.0)
            acc_base = tl.dot(x_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc_base,
                              input_precision=DOT_PRECISION)
            if with_student & (c0 < C_IN_S):
                # Same W tile; channels past the student's input width load zeros.
                xs_tile = tl.load(x_student_rows[:, None] + chan[None, :] * x_student_stride_c,
                                  mask=row_ok[:, None] & (chan[None, :] < C_IN_S), other=0.0)
                acc_student = tl.dot(xs_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc_student,
                                     input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc_base += bias[None, :]
        acc_student += bias[None, :]
    y_base_rows = y_base_ptr + image * y_base_stride_n + out_h * y_base_stride_h + out_w * y_base_stride_w
    tl.store(y_base_rows[:, None] + offs_n[None, :] * y_base_stride_c,
             acc_base.to(y_base_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if with_student:
        y_student_rows = (y_student_ptr + image * y_student_stride_n + out_h * y_student_stride_h
                          + out_w * y_student_stride_w)
        tl.store(y_student_rows[:, None] + offs_n[None, :] * y_student_stride_c,
                 acc_student.to(y_student_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_n[None, :] < C_OUT_S))


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_options(kernel, dtype: torch.dtype) -> dict:
    """DOT_DTYPE / DOT_PRECISION of the kernels' tl.dot for ``dtype`` inputs.

    Tiles are cast to DOT_DTYPE before each dot: the input dtype itself (a no-op
    when compiled), except on the interpreter of Triton 3.8, which multiplies bf16
    tiles as their raw 16-bit patterns (relative error 4e9 measured on a 16x16 dot),
    so there bf16 tiles are widened to fp32 (exact products). fp32 dots use "ieee":
    tf32 would break the fp32 tolerance of 1e-5.
    """
    widen = dtype == torch.bfloat16 and is_interpreted(kernel)
    dot_dtype = tl.float32 if widen else _TL_DTYPES[dtype]
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision}


def conv_output_like(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """An empty tensor with exactly the shape and strides F.conv2d gives for (x, weight).

    The custom op's fake implementation runs F.conv2d on fake tensors, so matching
    its memory format is part of the contract; torch's rule depends on the device's
    conv backend (cuDNN makes channels_last out of a channels_last x OR weight), so
    torch itself is asked, once per layout.
    """
    shape, strides = _conv_output_layout(
        (tuple(x.shape), x.stride(), x.dtype, x.device),
        (tuple(weight.shape), weight.stride()), tuple(stride), tuple(padding),
    )
    return torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)


@functools.lru_cache(maxsize=1024)
def _conv_output_layout(x_layout, weight_layout, stride, padding):
    shape, strides, dtype, device = x_layout
    with FakeTensorMode():
        fake_x = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        fake_w = torch.empty_strided(*weight_layout, dtype=dtype, device=device)
        fake_y = F.conv2d(fake_x, fake_w, None, stride, padding)
    return tuple(fake_y.shape), fake_y.stride()


def adjoined_conv2d_forward(
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_student: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_student) of the prefix-map adjoined conv (groups 1, dilation 1).

    ``out`` optionally gives the two output tensors to write (tests poison them to
    check that every element is written); by default they are allocated with
    F.conv2d's shape and memory format.
    """
    batch, c_in, height, width = x_base.shape
    c_out, _, kh, kw = weight.shape
    c_in_student = x_student.shape[1]
    if out is None:
        y_base = conv_output_like(x_base, weight, stride, padding)
        y_student = conv_output_like(x_student, weight[:out_student, :c_in_student], stride, padding)
    else:
        y_base, y_student = out
    h_out, w_out = y_base.shape[2:]
    m_rows = batch * h_out * w_out

    def grid(meta):
        return (triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    launch = autotuned(_adjoined_conv_fwd_kernel, "forward", x_base.device)
    launch(
        grid,
        x_base, x_student, weight, bias if bias is not None else weight, y_base, y_student,
        *x_base.stride(), *x_student.stride(), *weight.stride(), *y_base.stride(), *y_student.stride(),
        batch, height, width, c_in, c_in_student, h_out, w_out, c_out, out_student,
        stride[0], stride[1], padding[0], padding[1], kh, kw,
        HAS_BIAS=bias is not None, **dot_options(_adjoined_conv_fwd_kernel, x_base.dtype),
    )
    return y_base, y_student
