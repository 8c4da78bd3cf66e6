"""Fused adjoined convolution, weight gradient: base and student in one accumulator.

dW[o, c, kh, kw] = sum_m dY_b[m, o] X_b[m, (kh, kw, c)]
                 + [o < out_student and c < in_student] sum_m dY_s[m, o] X_s[m, (kh, kw, c)]

with m over N * H_out * W_out (DESIGN.md section 4). A program owns one
(BLOCK_N output channels) x (BLOCK_K input channels) tile of one (kh, kw) tap and
reduces over BLOCK_M rows at a time; tiles inside the student's block add the
student's dot to the same fp32 accumulator, so the shared gradient is stored once
(no second tensor for the student's part, no add kernel).

Split over m: early ResNet layers have few dW tiles (64x64x3x3 is 9 tiles of 64x64)
but 800k rows at batch 256, which would leave most SMs idle. With SPLIT_M > 1 each
program reduces a contiguous 1/SPLIT_M of the rows and stores its fp32 partial tile;
the host sums the partials. The base and student still share each accumulator.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from anfast.triton.forward import decode_rows, dot_options
from anfast.triton.tuning import autotuned

__all__ = ["adjoined_conv2d_wgrad", "choose_split_m"]


@triton.jit
def _adjoined_conv_wgrad_kernel(
    grad_base_ptr, grad_student_ptr, x_base_ptr, x_student_ptr, dw_ptr,
    # strides in (n, c, h, w) order for activations, (split, out, in, kh, kw) for dW
    grad_base_stride_n, grad_base_stride_c, grad_base_stride_h, grad_base_stride_w,
    grad_student_stride_n, grad_student_stride_c, grad_student_stride_h, grad_student_stride_w,
    x_base_stride_n, x_base_stride_c, x_base_stride_h, x_base_stride_w,
    x_student_stride_n, x_student_stride_c, x_student_stride_h, x_student_stride_w,
    dw_stride_split, dw_stride_o, dw_stride_i, dw_stride_h, dw_stride_w,
    # sizes: base channels C_*, student channels C_*_S (leading prefix)
    BATCH, H, W, C_IN, C_IN_S, H_OUT, W_OUT, C_OUT, C_OUT_S,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW, SPLIT_M,
    DOT_DTYPE: tl.constexpr,      # see forward.dot_options
    DOT_PRECISION: tl.constexpr,  # see forward.dot_options
    BLOCK_M: tl.constexpr,        # rows (output positions) per reduction step
    BLOCK_N: tl.constexpr,        # output channels per tile
    BLOCK_K: tl.constexpr,        # input channels per tile
):
    M = BATCH * H_OUT * W_OUT
    num_c_tiles = tl.cdiv(C_IN, BLOCK_K)
    pid_o = tl.program_id(0) // num_c_tiles
    pid_c = tl.program_id(0) % num_c_tiles
    khw = tl.program_id(1)
    split = tl.program_id(2)
    kh = khw // KW
    kw = khw % KW

    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    o_mask = offs_o < C_OUT
    c_mask = offs_c < C_IN
    with_student = (pid_o * BLOCK_N < C_OUT_S) & (pid_c * BLOCK_K < C_IN_S)
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        image, out_h, out_w = decode_rows(offs_m, H_OUT, W_OUT)
        in_h = out_h * STRIDE_H - PAD_H + kh
        in_w = out_w * STRIDE_W - PAD_W + kw
        row_ok = m_mask & (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
        grad_base_cols = (grad_base_ptr + image * grad_base_stride_n + out_h * grad_base_stride_h
                          + out_w * grad_base_stride_w)
        x_base_rows = x_base_ptr + image * x_base_stride_n + in_h * x_base_stride_h + in_w * x_base_stride_w
        g_tile = tl.load(grad_base_cols[None, :] + offs_o[:, None] * grad_base_stride_c,
                         mask=o_mask[:, None] & m_mask[None, :], other=0.0)
        x_tile = tl.load(x_base_rows[:, None] + offs_c[None, :] * x_base_stride_c,
                         mask=row_ok[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(g_tile.to(DOT_DTYPE), x_tile.to(DOT_DTYPE), acc,
                     input_precision=DOT_PRECISION)
        if with_student:
            # Masked to the student's block, so the one accumulator stays exact.
            grad_student_cols = (grad_student_ptr + image * grad_student_stride_n
                                 + out_h * grad_student_stride_h + out_w * grad_student_stride_w)
            x_student_rows = (x_student_ptr + image * x_student_stride_n + in_h * x_student_stride_h
                              + in_w * x_student_stride_w)
            gs_tile = tl.load(grad_student_cols[None, :] + offs_o[:, None] * grad_student_stride_c,
                              mask=(offs_o[:, None] < C_OUT_S) & m_mask[None, :], other=0.0)
            xs_tile = tl.load(x_student_rows[:, None] + offs_c[None, :] * x_student_stride_c,
                              mask=row_ok[:, None] & (offs_c[None, :] < C_IN_S), other=0.0)
            acc = tl.dot(gs_tile.to(DOT_DTYPE), xs_tile.to(DOT_DTYPE), acc,
                         input_precision=DOT_PRECISION)

    dw_tile = (dw_ptr + split * dw_stride_split + offs_o[:, None] * dw_stride_o
               + offs_c[None, :] * dw_stride_i + kh * dw_stride_h + kw * dw_stride_w)
    tl.store(dw_tile, acc.to(dw_ptr.dtype.element_ty), mask=o_mask[:, None] & c_mask[None, :])


def choose_split_m(rows: int, c_out: int, c_in: int, taps: int, target_programs: int = 264) -> int:
    """How many row splits keep about ``target_programs`` (2 per SM of an H100) busy.

    Counted with 64x64 dW tiles; each split keeps at least 2048 rows so the partial
    sums stay a small fraction of the work.
    """
    tiles = triton.cdiv(c_out, 64) * triton.cdiv(c_in, 64) * taps
    return max(1, min(triton.cdiv(target_programs, tiles), rows // 2048))


def adjoined_conv2d_wgrad(
    grad_base: torch.Tensor,
    grad_student: torch.Tensor,
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    split_m: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dW of the adjoined conv (base plus the student's leading block), weight's layout.

    ``split_m`` overrides the row split (default: choose_split_m; the interpreter
    uses 1); ``out`` optionally gives the dW tensor to write when no split is used.
    """
    batch, c_in, height, width = x_base.shape
    c_out, _, kh, kw = weight.shape
    c_in_student, out_student = x_student.shape[1], grad_student.shape[1]
    h_out, w_out = grad_base.shape[2:]
    m_rows = batch * h_out * w_out
    if split_m is None:
        split_m = choose_split_m(m_rows, c_out, c_in, kh * kw) if x_base.is_cuda else 1
    if split_m == 1:
        dw = out if out is not None else torch.empty_like(weight)
        target, split_stride = dw, 0
    else:
        target = torch.empty((split_m, *weight.shape), dtype=torch.float32, device=weight.device)
        split_stride = target.stride(0)

    def grid(meta):
        return (triton.cdiv(c_out, meta["BLOCK_N"]) * triton.cdiv(c_in, meta["BLOCK_K"]), kh * kw, split_m)

    dw_strides = target.stride()[1:] if split_m > 1 else target.stride()
    launch = autotuned(_adjoined_conv_wgrad_kernel, "wgrad", x_base.device)
    launch(
        grid,
        grad_base, grad_student, x_base, x_student, target,
        *grad_base.stride(), *grad_student.stride(), *x_base.stride(), *x_student.stride(),
        split_stride, *dw_strides,
        batch, height, width, c_in, c_in_student, h_out, w_out, c_out, out_student,
        stride[0], stride[1], padding[0], padding[1], kh, kw, split_m,
        **dot_options(_adjoined_conv_wgrad_kernel, x_base.dtype),
    )
    if split_m == 1:
        return dw
    dw = out if out is not None else torch.empty_like(weight)
    return dw.copy_(target.sum(0))
