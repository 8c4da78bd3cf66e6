"""Fused adjoined convolution, input gradients: dX_base and dX_student in one launch.

dX[b, c, h, w] = sum over (kh, kw, o) of dY[b, o, oh, ow] * W[o, c, kh, kw], where
oh * stride_h - pad_h + kh = h. Implicit GEMM with rows m over input positions,
columns over input channels c and the reduction over (kh, kw, o).

Stride s > 1 is decomposed into s * s phases (DESIGN.md section 4): the input rows h
with (h + pad_h) % s == q_h receive exactly the taps kh = q_h + j * s, from output row
oh = oh0 + i - j where h = h_first + s * i. Each phase is a dense stride-1 problem
over a sub-sampled kernel, so no masked-zero product is ever multiplied; a phase
with no taps (1x1 kernels, stride 2) stores zeros. Grid axis 1 is the phase.

Grid axis 0 is a grouped GEMM over two problems sharing W, as in the forward: base
tiles first (dY_base (x) W^T over all channels), then student tiles in the
student's own tile shape (dY_student (x) W[:out_student, :in_student]^T, reducing
only over out_student, writing only in_student). One accumulator per program; one
flat K loop over (tap, channel block).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from anfast.triton.forward import STUDENT_STAGES, decode_rows, dot_options, grouped_tile, next_step
from anfast.triton.tuning import autotuned, student_block

__all__ = ["adjoined_conv2d_dgrad"]


@triton.jit
def _conv_dgrad_tile(
    tile, g_ptr, sg_n, sg_c, sg_h, sg_w, w_ptr, sw_o, sw_i, sw_h, sw_w, dx_ptr, sdx_n, sdx_c, sdx_h, sdx_w,
    BATCH, H, W, C_IN, H_OUT, W_OUT, C_RED, Q_H, Q_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One dX tile of phase (Q_H, Q_W) of one problem: C_IN channels, reduced over C_RED.

    STAGES: the K loop's pipeline depth (None: the config's; see forward.STUDENT_STAGES)."""
    # (q + (s - 1) * pad) % s == (q - pad) mod s without a negative operand.
    h_first = (Q_H + (STRIDE_H - 1) * PAD_H) % STRIDE_H
    w_first = (Q_W + (STRIDE_W - 1) * PAD_W) % STRIDE_W
    rows_p = (H - h_first + STRIDE_H - 1) // STRIDE_H
    cols_p = (W - w_first + STRIDE_W - 1) // STRIDE_W
    taps_h = (KH - Q_H + STRIDE_H - 1) // STRIDE_H
    taps_w = (KW - Q_W + STRIDE_W - 1) // STRIDE_W
    M = BATCH * rows_p * cols_p
    if tile < tl.cdiv(M, BLOCK_M) * tl.cdiv(C_IN, BLOCK_N):
        pid_m, pid_c = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(C_IN, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        c_mask = offs_c < C_IN
        image, row, col = decode_rows(offs_m, rows_p, cols_p)
        # Output row of tap j: oh0 + row - j (exact: h + pad - kh divides by the stride).
        out_h0 = (h_first + PAD_H - Q_H) // STRIDE_H + row
        out_w0 = (w_first + PAD_W - Q_W) // STRIDE_W + col
        g_rows = g_ptr + image * sg_n + out_h0 * sg_h + out_w0 * sg_w
        w_cols = w_ptr + offs_c * sw_i + Q_H * sw_h + Q_W * sw_w

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        o0 = 0
        jw = 0
        jh = 0
        for _ in tl.range(0, taps_h * taps_w * tl.cdiv(C_RED, BLOCK_K), num_stages=STAGES):
            out_h = out_h0 - jh
            out_w = out_w0 - jw
            row_ok = m_mask & (out_h >= 0) & (out_h < H_OUT) & (out_w >= 0) & (out_w < W_OUT)
            # A counter that stays a multiple of BLOCK_K: stated for the alignment analysis,
            # which does not follow loop-carried values (16-byte vector loads need it).
            o0 = tl.multiple_of(o0, BLOCK_K)
            out_chan = o0 + offs_k
            g_tile = tl.load(g_rows[:, None] - (jh * sg_h + jw * sg_w) + out_chan[None, :] * sg_c,
                             mask=row_ok[:, None] & (out_chan[None, :] < C_RED), other=0.0)
            w_tile = tl.load(w_cols[None, :] + (jh * STRIDE_H * sw_h + jw * STRIDE_W * sw_w)
                             + out_chan[:, None] * sw_o,
                             mask=(out_chan[:, None] < C_RED) & c_mask[None, :], other=0.0)
            acc = tl.dot(g_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
            o0, jw, jh = next_step(o0, jw, jh, C_RED, taps_w, BLOCK_K)

        in_h = h_first + row * STRIDE_H
        in_w = w_first + col * STRIDE_W
        dx_rows = dx_ptr + image * sdx_n + in_h * sdx_h + in_w * sdx_w
        tl.store(dx_rows[:, None] + offs_c[None, :] * sdx_c, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & c_mask[None, :])


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
    STUDENT_N: tl.constexpr,        # student's input channels rounded up (tuning.student_block)
    STUDENT_K: tl.constexpr,        # student's output channels rounded up
    BLOCK_M: tl.constexpr,          # input positions per tile
    BLOCK_N: tl.constexpr,          # input channels per base tile (student: min(BLOCK_N, STUDENT_N))
    BLOCK_K: tl.constexpr,          # output channels per reduction step (student: min(BLOCK_K, STUDENT_K))
    GROUP_M: tl.constexpr,          # m tiles that walk the channel tiles together
):
    phase = tl.program_id(1)
    q_h = phase // STRIDE_W
    q_w = phase % STRIDE_W
    # Axis 0 is sized for the largest phase; smaller phases' extra programs do nothing.
    rows_max = BATCH * tl.cdiv(H, STRIDE_H) * tl.cdiv(W, STRIDE_W)
    base_tiles = tl.cdiv(rows_max, BLOCK_M) * tl.cdiv(C_IN, BLOCK_N) if COMPUTE_BASE else 0
    pid = tl.program_id(0)
    if pid < base_tiles:
        _conv_dgrad_tile(
            pid, grad_base_ptr, grad_base_stride_n, grad_base_stride_c, grad_base_stride_h, grad_base_stride_w,
            weight_ptr, weight_stride_o, weight_stride_i, weight_stride_h, weight_stride_w,
            dx_base_ptr, dx_base_stride_n, dx_base_stride_c, dx_base_stride_h, dx_base_stride_w,
            BATCH, H, W, C_IN, H_OUT, W_OUT, C_OUT, q_h, q_w, STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
            DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, None)
    elif COMPUTE_STUDENT:
        _conv_dgrad_tile(
            pid - base_tiles, grad_student_ptr, grad_student_stride_n, grad_student_stride_c,
            grad_student_stride_h, grad_student_stride_w,
            weight_ptr, weight_stride_o, weight_stride_i, weight_stride_h, weight_stride_w,
            dx_student_ptr, dx_student_stride_n, dx_student_stride_c, dx_student_stride_h, dx_student_stride_w,
            BATCH, H, W, C_IN_S, H_OUT, W_OUT, C_OUT_S, q_h, q_w, STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
            DOT_DTYPE, DOT_PRECISION, BLOCK_M,
            BLOCK_N if BLOCK_N < STUDENT_N else STUDENT_N, BLOCK_K if BLOCK_K < STUDENT_K else STUDENT_K,
            GROUP_M, STUDENT_STAGES)


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
    student_n, student_k = student_block(c_in_student), student_block(out_student)
    # Axis 0 covers the largest stride phase (see _adjoined_conv_dgrad_kernel), axis 1 the phases.
    rows_max = batch * triton.cdiv(height, stride[0]) * triton.cdiv(width, stride[1])

    def grid(meta):
        tiles = triton.cdiv(rows_max, meta["BLOCK_M"])
        base = triton.cdiv(c_in, meta["BLOCK_N"]) if need_base else 0
        student = triton.cdiv(c_in_student, min(meta["BLOCK_N"], student_n)) if need_student else 0
        return (tiles * (base + student), stride[0] * stride[1])

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
        COMPUTE_BASE=need_base, COMPUTE_STUDENT=need_student, STUDENT_N=student_n, STUDENT_K=student_k,
        **dot_options(_adjoined_conv_dgrad_kernel, x_base.dtype),
    )
    return dx_base, dx_student
