"""Fused adjoined convolution, weight gradient: base and student in one accumulator.

dW[o, c, kh, kw] = sum_m dY_b[m, o] X_b[m, (kh, kw, c)]
                 + [o < out_student and c < in_student] sum_m dY_s[m, o] X_s[m, (kh, kw, c)]

with m over N * H_out * W_out (DESIGN.md section 4). A program owns one
(BLOCK_N output channels) x (BLOCK_K input channels) tile of one (kh, kw) tap with
ONE fp32 accumulator: a concatenated reduction, first over the base rows, then (only
for tiles that meet the student's block) over the student rows, masked to that block.
The shared gradient is stored once: no second tensor for the student's part, no add.

Split over m: early ResNet layers have few dW tiles (a 64x64 1x1 conv is one tile)
but 800k rows at batch 256, which would leave most SMs idle. The split is chosen
from the config that runs (its tile count against the SM count); with a split,
program s reduces the s-th contiguous share of the rows into an fp32 partial tile,
and a second stage sums the partials in a fixed order (deterministic).

Rows advance by carries instead of a division per step (see advance_rows).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from anfast.triton.forward import decode_rows, dot_options
from anfast.triton.tuning import autotuned

__all__ = ["adjoined_conv2d_wgrad", "choose_split_m"]

# SMs of an H100 SXM: the split's target where no device can be asked (meta tensors).
ASSUMED_SMS = 132


@triton.jit
def advance_rows(image, out_h, out_w, STEP_IMAGES, STEP_H, STEP_W, H_OUT, W_OUT):
    """(image, y, x) of rows m + step, given those of m and step = (STEP_IMAGES, STEP_H,
    STEP_W) in mixed radix: each digit carries at most once, so no division."""
    out_w = out_w + STEP_W
    carry = out_w >= W_OUT
    out_w = tl.where(carry, out_w - W_OUT, out_w)
    out_h = out_h + STEP_H + carry.to(tl.int32)
    carry = out_h >= H_OUT
    out_h = tl.where(carry, out_h - H_OUT, out_h)
    return image + STEP_IMAGES + carry.to(tl.int32), out_h, out_w


@triton.jit
def _wgrad_rows(
    acc, g_ptr, sg_n, sg_c, sg_h, sg_w, x_ptr, sx_n, sx_c, sx_h, sx_w, offs_o, offs_c, C_O, C_I,
    m_start, m_end, kh, kw, H, W, H_OUT, W_OUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """acc + dY[rows, :C_O]^T X[rows, tap (kh, kw), :C_I] over rows [m_start, m_end)."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    image, out_h, out_w = decode_rows(offs_m, H_OUT, W_OUT)
    step_images = BLOCK_M // (H_OUT * W_OUT)
    step_h = (BLOCK_M // W_OUT) % H_OUT
    step_w = BLOCK_M % W_OUT
    o_mask = offs_o < C_O
    c_mask = offs_c < C_I
    for m0 in range(m_start, m_end, BLOCK_M):
        m_mask = (m0 + tl.arange(0, BLOCK_M)) < m_end
        in_h = out_h * STRIDE_H - PAD_H + kh
        in_w = out_w * STRIDE_W - PAD_W + kw
        row_ok = m_mask & (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
        g_cols = g_ptr + image * sg_n + out_h * sg_h + out_w * sg_w
        x_rows = x_ptr + image * sx_n + in_h * sx_h + in_w * sx_w
        g_tile = tl.load(g_cols[None, :] + offs_o[:, None] * sg_c, mask=o_mask[:, None] & m_mask[None, :],
                         other=0.0)
        x_tile = tl.load(x_rows[:, None] + offs_c[None, :] * sx_c, mask=row_ok[:, None] & c_mask[None, :],
                         other=0.0)
        acc = tl.dot(g_tile.to(DOT_DTYPE), x_tile.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        image, out_h, out_w = advance_rows(image, out_h, out_w, step_images, step_h, step_w, H_OUT, W_OUT)
    return acc


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
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, KH, KW,
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
    # The split is grid axis 2, chosen on the host from the config (choose_split_m).
    rows_per_split = tl.cdiv(tl.cdiv(M, tl.num_programs(2)), BLOCK_M) * BLOCK_M
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc = _wgrad_rows(
        acc, grad_base_ptr, grad_base_stride_n, grad_base_stride_c, grad_base_stride_h, grad_base_stride_w,
        x_base_ptr, x_base_stride_n, x_base_stride_c, x_base_stride_h, x_base_stride_w, offs_o, offs_c,
        C_OUT, C_IN, m_start, m_end, kh, kw, H, W, H_OUT, W_OUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
        DOT_DTYPE, DOT_PRECISION, BLOCK_M)
    if (pid_o * BLOCK_N < C_OUT_S) & (pid_c * BLOCK_K < C_IN_S):
        # The student's rows, masked to its block, continue the same accumulator.
        acc = _wgrad_rows(
            acc, grad_student_ptr, grad_student_stride_n, grad_student_stride_c, grad_student_stride_h,
            grad_student_stride_w, x_student_ptr, x_student_stride_n, x_student_stride_c,
            x_student_stride_h, x_student_stride_w, offs_o, offs_c, C_OUT_S, C_IN_S, m_start, m_end, kh, kw,
            H, W, H_OUT, W_OUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DOT_DTYPE, DOT_PRECISION, BLOCK_M)

    dw_tile = (dw_ptr + split * dw_stride_split + offs_o[:, None] * dw_stride_o
               + offs_c[None, :] * dw_stride_i + kh * dw_stride_h + kw * dw_stride_w)
    tl.store(dw_tile, acc.to(dw_ptr.dtype.element_ty), mask=(offs_o[:, None] < C_OUT) & (offs_c[None, :] < C_IN))


def choose_split_m(rows: int, tiles: int, sms: int, min_rows: int = 2048) -> int:
    """Row splits that bring ``tiles`` dW tiles up to about 2 programs per SM.

    Each split keeps at least ``min_rows`` rows, so the partial tiles stay a small
    fraction of the work; tiles that fill the GPU alone get no split.
    """
    return max(1, min(triton.cdiv(2 * sms, tiles), rows // min_rows))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return ASSUMED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


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

    ``split_m`` fixes the row split (default: choose_split_m for the config that runs;
    the interpreter's single config on a CPU tensor gets none); ``out`` optionally
    gives the dW tensor to write.
    """
    batch, c_in, height, width = x_base.shape
    c_out, _, kh, kw = weight.shape
    c_in_student, out_student = x_student.shape[1], grad_student.shape[1]
    h_out, w_out = grad_base.shape[2:]
    m_rows = batch * h_out * w_out
    launch = autotuned(_adjoined_conv_wgrad_kernel, "wgrad", x_base.device)
    sms = _sm_count(x_base.device)

    def splits(meta) -> int:
        if split_m is not None:
            return split_m
        if x_base.device.type == "cpu":
            return 1
        tiles = triton.cdiv(c_out, meta["BLOCK_N"]) * triton.cdiv(c_in, meta["BLOCK_K"]) * kh * kw
        return choose_split_m(m_rows, tiles, sms)

    dw = out if out is not None else torch.empty_like(weight)
    most = max(splits(meta) for meta in launch.metas)
    # Without a split anywhere the kernel writes dW itself; otherwise fp32 partials.
    if most == 1:
        target = dw
    else:
        # Partials in dW's own dimension order, so the kernel's stores stay contiguous.
        proto = torch.empty_like(dw, dtype=torch.float32)
        target = torch.empty_strided((most, *dw.shape), (proto.numel(), *proto.stride()), dtype=torch.float32,
                                     device=dw.device)
    split_stride = 0 if most == 1 else target.stride(0)
    dw_strides = target.stride() if most == 1 else target.stride()[1:]

    def grid(meta):
        return (triton.cdiv(c_out, meta["BLOCK_N"]) * triton.cdiv(c_in, meta["BLOCK_K"]), kh * kw, splits(meta))

    meta = launch(
        grid,
        grad_base, grad_student, x_base, x_student, target,
        *grad_base.stride(), *grad_student.stride(), *x_base.stride(), *x_student.stride(),
        split_stride, *dw_strides,
        batch, height, width, c_in, c_in_student, h_out, w_out, c_out, out_student,
        stride[0], stride[1], padding[0], padding[1], kh, kw,
        **dot_options(_adjoined_conv_wgrad_kernel, x_base.dtype),
    )
    if most == 1:
        return dw
    # Second stage: the chosen config's partials, summed in split order.
    return dw.copy_(target[: splits(meta)].sum(0))
