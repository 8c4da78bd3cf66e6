"""Fused adjoined convolution, forward: base and student outputs in one launch.

Implicit GEMM (DESIGN.md section 4, version 2). Rows m run over N * H_out * W_out
output positions, columns n over output channels, and the reduction k over
(kh, kw, input channel). The launch is a grouped GEMM over two problems that share
W: the first programs each own one (BLOCK_M x BLOCK_N) tile of the base output, the
rest one tile of the student output, in the student's own tile shape (its channel
block narrowed to the student's width) with ONE accumulator per program. Student
programs reduce only over in_student and write only out_student; they come last, so
the small student tiles fill the tail of the base's last wave.

The K loop is one flat loop over (tap, channel block): row offsets are computed once
per tile and the tap advances by counters, so the software pipeline never drains
between taps and the loop holds no integer division.

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

from anfast.triton.tuning import autotuned, is_interpreted, student_block

__all__ = ["adjoined_conv2d_forward", "conv_output_like", "dot_options"]

# Pipeline depth of the student tiles' K loop. A student loop pipelined like the base's,
# with the same tile shape, got its own shared-memory buffers next to the base's
# (twice the shared memory, 1 CTA per SM; kernel_report on layer3.0.conv2); a distinct
# depth lets the two branches share them. Student tiles are few: 2 stages suffice.
STUDENT_STAGES = tl.constexpr(2)


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
    """GEMM rows m as (image, y, x) over a batch x rows x cols grid (NHW order).

    Offsets stay int32 (8 registers fewer per tile row than int64, the margin between
    spilling and not at 128 registers): tensors of 2**31 elements or more are refused
    by TritonBackend.unsupported_reasons."""
    return offs_m // (cols * rows), (offs_m // cols) % rows, offs_m % cols


@triton.jit
def next_step(c0, tw, th, C, TW, BLOCK: tl.constexpr):
    """Advance the flat (tap row th, tap column tw, channel block c0) counter of a K loop."""
    c0 += BLOCK
    wrap = c0 >= C
    c0 = tl.where(wrap, 0, c0)
    tw = tl.where(wrap, tw + 1, tw)
    wrap = tw >= TW
    tw = tl.where(wrap, 0, tw)
    th = tl.where(wrap, th + 1, th)
    return c0, tw, th


@triton.jit
def _conv_fwd_tile(
    tile, x_ptr, sx_n, sx_c, sx_h, sx_w, w_ptr, sw_o, sw_i, sw_h, sw_w, bias_ptr,
    y_ptr, sy_n, sy_c, sy_h, sy_w,
    M, H, W, C_IN, H_OUT, W_OUT, C_OUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One output tile of one problem (x (*) W[:C_OUT, :C_IN] -> y) with one accumulator.

    STAGES: the K loop's pipeline depth (None: the config's num_stages)."""
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(C_OUT, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C_OUT
    image, out_h, out_w = decode_rows(offs_m, H_OUT, W_OUT)
    in_h0 = out_h * STRIDE_H - PAD_H
    in_w0 = out_w * STRIDE_W - PAD_W
    # Row and column offsets once per tile; each K step adds its tap's scalar offset.
    x_rows = x_ptr + image * sx_n + in_h0 * sx_h + in_w0 * sx_w
    w_cols = w_ptr + offs_n * sw_o

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c0 = 0
    kw = 0
    kh = 0
    for _ in tl.range(0, KH * KW * tl.cdiv(C_IN, BLOCK_K), num_stages=STAGES):
        in_h = in_h0 + kh
        in_w = in_w0 + kw
        # Rows whose tap falls in the zero padding load zeros.
        row_ok = m_mask & (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
        # A counter that stays a multiple of BLOCK_K: stated for the alignment analysis,
        # which does not follow loop-carried values (16-byte vector loads need it).
        c0 = tl.multiple_of(c0, BLOCK_K)
        chan = c0 + offs_k
        x_tile = tl.load(x_rows[:, None] + (kh * sx_h + kw * sx_w) + chan[None, :] * sx_c,
                         mask=row_ok[:, None] & (chan[None, :] < C_IN), other=0.0)
        w_tile = tl.load(w_cols[None, :] + (kh * sw_h + kw * sw_w) + chan[:, None] * sw_i,
                         mask=(chan[:, None] < C_IN) & n_mask[None, :], other=0.0)
        acc = tl.dot(x_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        c0, kw, kh = next_step(c0, kw, kh, C_IN, KW, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + image * sy_n + out_h * sy_h + out_w * sy_w
    tl.store(y_rows[:, None] + offs_n[None, :] * sy_c, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


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
    STUDENT_N: tl.constexpr,      # student's output channels rounded up (tuning.student_block)
    STUDENT_K: tl.constexpr,      # student's input channels rounded up
    BLOCK_M: tl.constexpr,        # output positions per tile
    BLOCK_N: tl.constexpr,        # output channels per base tile (student: min(BLOCK_N, STUDENT_N))
    BLOCK_K: tl.constexpr,        # input channels per reduction step (student: min(BLOCK_K, STUDENT_K))
    GROUP_M: tl.constexpr,        # m tiles that walk the n tiles together (L2 reuse of W)
):
    M = BATCH * H_OUT * W_OUT
    base_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(C_OUT, BLOCK_N)
    pid = tl.program_id(0)
    if pid < base_tiles:
        _conv_fwd_tile(
            pid, x_base_ptr, x_base_stride_n, x_base_stride_c, x_base_stride_h, x_base_stride_w,
            weight_ptr, weight_stride_o, weight_stride_i, weight_stride_h, weight_stride_w, bias_ptr,
            y_base_ptr, y_base_stride_n, y_base_stride_c, y_base_stride_h, y_base_stride_w,
            M, H, W, C_IN, H_OUT, W_OUT, C_OUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
            HAS_BIAS, DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, None)
    else:
        _conv_fwd_tile(
            pid - base_tiles, x_student_ptr, x_student_stride_n, x_student_stride_c, x_student_stride_h,
            x_student_stride_w, weight_ptr, weight_stride_o, weight_stride_i, weight_stride_h, weight_stride_w,
            bias_ptr, y_student_ptr, y_student_stride_n, y_student_stride_c, y_student_stride_h,
            y_student_stride_w, M, H, W, C_IN_S, H_OUT, W_OUT, C_OUT_S, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
            KH, KW, HAS_BIAS, DOT_DTYPE, DOT_PRECISION, BLOCK_M,
            BLOCK_N if BLOCK_N < STUDENT_N else STUDENT_N, BLOCK_K if BLOCK_K < STUDENT_K else STUDENT_K,
            GROUP_M, STUDENT_STAGES)


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

    student_n, student_k = student_block(out_student), student_block(c_in_student)

    def grid(meta):
        rows = triton.cdiv(m_rows, meta["BLOCK_M"])
        return (rows * (triton.cdiv(c_out, meta["BLOCK_N"])
                        + triton.cdiv(out_student, min(meta["BLOCK_N"], student_n))),)

    launch = autotuned(_adjoined_conv_fwd_kernel, "forward", x_base.device)
    launch(
        grid,
        x_base, x_student, weight, bias if bias is not None else weight, y_base, y_student,
        *x_base.stride(), *x_student.stride(), *weight.stride(), *y_base.stride(), *y_student.stride(),
        batch, height, width, c_in, c_in_student, h_out, w_out, c_out, out_student,
        stride[0], stride[1], padding[0], padding[1], kh, kw,
        HAS_BIAS=bias is not None, STUDENT_N=student_n, STUDENT_K=student_k,
        **dot_options(_adjoined_conv_fwd_kernel, x_base.dtype),
    )
    return y_base, y_student
