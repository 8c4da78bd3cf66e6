"""The "gemm" backend of anfast.ops.adjoined_conv2d: 1x1 convs as cuBLAS GEMMs on views.

A 1x1 conv of a channels_last (NHWC-contiguous) input is a matrix product: the
input's pixels are the rows of an [N*H*W, C_in] matrix (a view, no copy) and

    y_base    = x_base_rows    @ W2d^T                       (+ bias)
    y_student = x_student_rows @ W2d[:out_student, :c_in]^T  (+ bias[:out_student])

with W2d = weight[:, :, 0, 0], so the student's weight is a strided view of the
shared one, which cuBLAS takes without a copy (its leading dimension is C_in). The
results are the NHWC outputs. Backward: dgrad = grad_rows @ W2d (the student's with
its slice), wgrad dW = grad_base_rows^T @ x_base_rows, and the student's
grad_student_rows^T @ x_student_rows accumulated straight into dW[:out_student, :c_in]
(addmm with beta 1), with no padded copy. On the ResNet-50 1x1 convs cuDNN reached a
tenth of what their bytes allow on an H200 (issue 24), so plain GEMMs may win there.

Stride s > 1 reads the rows of x[:, :, ::s, ::s]. That strided view is no single GEMM
operand (its rows have two strides, s*C_in along a row of pixels and s*W*C_in between
rows), so the rows are gathered: one copy of 1/s^2 of the input, bandwidth-bound next
to the GEMM. It is unmeasured on a GPU; a strided-batched GEMM over the N*H_out pixel
rows would avoid the copy where H divides by s. dgrad writes the product into the
strided positions of a zeroed dx.

``traced_adjoined_conv1x1`` is the same computation as a torch.autograd.Function, so
that a conv whose backend is fixed to gemm reaches torch.compile as aten matmuls
rather than an opaque custom op.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from anfast.ops.backend import (
    FUSED_DTYPES,
    Backend,
    BackendUnavailable,
    ConvProblem,
    fused_kernel_reasons,
)

__all__ = [
    "GemmBackend",
    "BACKEND",
    "gemm_forward",
    "gemm_dgrad",
    "gemm_wgrad",
    "gemm_backward",
    "traced_adjoined_conv1x1",
]

# float64 too: a GEMM has no tensor-core tile to fit, and the tests compare in float64.
GEMM_DTYPES = (*FUSED_DTYPES, torch.float64)


def _rows(x: torch.Tensor, stride: Sequence[int] = (1, 1)) -> torch.Tensor:
    """The pixels of x[:, :, ::s_h, ::s_w] as an [N*H_out*W_out, C] matrix: a view for a
    channels_last input at stride 1, a gathered copy otherwise (see the module docstring)."""
    stride_h, stride_w = stride
    return x.permute(0, 2, 3, 1)[:, ::stride_h, ::stride_w].reshape(-1, x.shape[1])


def _row_view(out: torch.Tensor) -> torch.Tensor:
    """The [N*H*W, C] view of a channels_last buffer that a GEMM writes into (raises
    rather than copy, since a write into a copy would be lost)."""
    return out.permute(0, 2, 3, 1).view(-1, out.shape[1])


def _has_channels_last_strides(t: torch.Tensor) -> bool:
    """Tensor::suggest_memory_format() == channels_last, which Python does not expose
    (c10's is_channels_last_strides_2d_s4): NHWC-ordered strides, ambiguous ones NCHW."""
    if t.dim() != 4 or t.stride(1) == 0:
        return False
    smallest = 0
    for dim in (1, 3, 2, 0):
        size, stride = t.shape[dim], t.stride(dim)
        if size == 0 or stride < smallest or (dim == 0 and smallest == t.stride(1)):
            return False
        smallest = stride * size if size > 1 else stride
    return True


def _new_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """An uninitialized conv output in the layout F.conv2d gives (cuDNN and oneDNN alike):
    channels_last when the input or the weight has channels_last strides, else NCHW.
    Only an input of one channel (or a 1x1 image) with NCHW strides gives NCHW here."""
    h_out, w_out = (-(-size // s) for size, s in zip(x.shape[2:], stride))  # len(range(0, size, s))
    if _has_channels_last_strides(x) or _has_channels_last_strides(weight):
        return x.new_empty((x.shape[0], h_out, w_out, weight.shape[0])).permute(0, 3, 1, 2)
    return x.new_empty((x.shape[0], weight.shape[0], h_out, w_out))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            stride: Sequence[int], out: Optional[torch.Tensor]) -> torch.Tensor:
    """One network's 1x1 conv: rows @ weight2d^T (+ bias), written into ``out`` (into its
    rows when it is NHWC, else through a transposing copy)."""
    if out is None:
        out = _new_output(x, weight, stride)
    nhwc = out.permute(0, 2, 3, 1)
    rows_out = _row_view(out) if nhwc.is_contiguous() else None
    weight2d = weight[:, :, 0, 0]
    if bias is None:
        product = torch.mm(_rows(x, stride), weight2d.t(), out=rows_out)
    else:
        product = torch.addmm(bias, _rows(x, stride), weight2d.t(), out=rows_out)
    if rows_out is None:
        nhwc.copy_(product.view(nhwc.shape))
    return out


def gemm_forward(
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_student: int,
    stride: Sequence[int],
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_student) of a 1x1 adjoined conv, two GEMMs on views of one weight.

    ``out``: channels_last (y_base, y_student) buffers to write (tests poison them);
    by default new ones in the layout F.conv2d gives (NHWC for channels_last inputs).
    """
    out_base, out_student_buffer = (None, None) if out is None else out
    y_base = _linear(x_base, weight, bias, stride, out_base)
    y_student = _linear(x_student, weight[:out_student, : x_student.shape[1]],
                        None if bias is None else bias[:out_student], stride, out_student_buffer)
    return y_base, y_student


def gemm_dgrad(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dx of one network (``weight`` is its own, the student's a slice): grad_rows @ W2d,
    placed at the strided pixels of a zeroed dx when the stride is above 1. ``out``: the
    channels_last dx buffer to write, by default one like ``x`` (the layout the custom
    op's fake implementation promises)."""
    if out is None:
        out = torch.empty_like(x)
    weight2d = weight[:, :, 0, 0]
    if tuple(stride) == (1, 1):
        torch.mm(_rows(grad), weight2d, out=_row_view(out))
        return out
    stride_h, stride_w = stride
    out.zero_()
    n, _, h_out, w_out = grad.shape
    out.permute(0, 2, 3, 1)[:, ::stride_h, ::stride_w].copy_(
        torch.mm(_rows(grad), weight2d).view(n, h_out, w_out, -1))
    return out


def gemm_wgrad(
    grad_base: torch.Tensor,
    grad_student: torch.Tensor,
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dW = grad_base_rows^T @ x_base_rows, then the student's product accumulated into
    dW[:out_student, :c_in] in place (beta 1). ``out``: the dW buffer, by default one
    like ``weight`` (the layout the custom op's fake implementation promises)."""
    if out is None:
        out = torch.empty_like(weight)
    dweight2d = out[:, :, 0, 0]
    torch.mm(_rows(grad_base).t(), _rows(x_base, stride), out=dweight2d)
    dweight2d[: grad_student.shape[1], : x_student.shape[1]].addmm_(
        _rows(grad_student).t(), _rows(x_student, stride))
    return out


def gemm_backward(
    grad_base: torch.Tensor,
    grad_student: torch.Tensor,
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    out_student: int,
    stride: Sequence[int],
    output_mask: Sequence[bool],
) -> tuple[Optional[torch.Tensor], ...]:
    """(dx_base, dx_student, dweight, dbias) of a 1x1 adjoined conv; None where
    ``output_mask`` does not ask."""
    need_dx_base, need_dx_student, need_weight, need_bias = output_mask
    dx_base = gemm_dgrad(grad_base, x_base, weight, stride) if need_dx_base else None
    dx_student = (gemm_dgrad(grad_student, x_student, weight[:out_student, : x_student.shape[1]],
                             stride) if need_dx_student else None)
    dweight = (gemm_wgrad(grad_base, grad_student, x_base, x_student, weight, stride)
               if need_weight else None)
    dbias = None
    if need_bias and has_bias:
        # A channel sum is bandwidth-bound and cheap next to the GEMMs: torch does it, in
        # float32 for 16-bit inputs (float64 stays float64).
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        dbias = grad_base.sum((0, 2, 3), dtype=accumulate)
        dbias[:out_student] += grad_student.sum((0, 2, 3), dtype=accumulate)
        dbias = dbias.to(weight.dtype)
    return dx_base, dx_student, dweight, dbias


def _layout_reason(name: str, x: torch.Tensor) -> list[str]:
    if x.is_contiguous(memory_format=torch.channels_last):
        return []
    return [f"{name} is not channels_last (strides {x.stride()}): the gemm backend multiplies the "
            f"[N*H*W, C] view of NHWC activations and would have to copy an NCHW one; pass "
            f"{name}.contiguous(memory_format=torch.channels_last) (model.to(memory_format="
            f"torch.channels_last)) or use backend='torch'"]


class GemmBackend(Backend):
    """1x1 convs (padding 0, any stride) of channels_last inputs as GEMMs on views:
    groups 1, dilation 1, prefix channel map, fp32 / bf16 / fp16 / fp64, any device
    torch.mm runs on (auto tunes on CUDA only)."""

    name = "gemm"

    def unsupported_reasons(self, problem: ConvProblem, explicit: bool) -> list[str]:
        reasons = fused_kernel_reasons(problem, "the gemm kernels", dtypes=GEMM_DTYPES)
        kernel_size = tuple(problem.weight.shape[2:])
        if kernel_size != (1, 1):
            reasons.append(f"kernel size {kernel_size} (the gemm backend runs 1x1 convs only; "
                           "backend='cuda', 'triton' or 'torch' run larger kernels)")
        if tuple(problem.padding) != (0, 0):
            reasons.append(f"padding={tuple(problem.padding)} (a 1x1 conv is a GEMM only without "
                           "padding; use padding=0 or backend='torch')")
        reasons += _layout_reason("x_base", problem.x_base)
        reasons += _layout_reason("x_student", problem.x_student)
        return reasons

    def forward(self, problem: ConvProblem) -> tuple[torch.Tensor, torch.Tensor]:
        return gemm_forward(problem.x_base, problem.x_student, problem.weight, problem.bias,
                            problem.out_student, problem.stride)

    def backward(
        self,
        grad_base: torch.Tensor,
        grad_student: torch.Tensor,
        problem: ConvProblem,
        output_mask: tuple[bool, bool, bool, bool],
    ) -> tuple[Optional[torch.Tensor], ...]:
        return gemm_backward(grad_base, grad_student, problem.x_base, problem.x_student,
                             problem.weight, problem.bias is not None, problem.out_student,
                             problem.stride, output_mask)


BACKEND = GemmBackend()


class _AdjoinedConv1x1(torch.autograd.Function):
    """gemm_forward / gemm_backward as an autograd.Function, which dynamo traces into
    aten matmuls (the custom op stays one opaque node)."""

    @staticmethod
    def forward(ctx, x_base, x_student, weight, bias, out_student, stride):
        ctx.save_for_backward(x_base, x_student, weight)
        ctx.config = (bias is not None, out_student, stride)
        return gemm_forward(x_base, x_student, weight, bias, out_student, stride)

    @staticmethod
    def backward(ctx, grad_base, grad_student):
        x_base, x_student, weight = ctx.saved_tensors
        has_bias, out_student, stride = ctx.config
        needs = ctx.needs_input_grad
        grads = gemm_backward(grad_base, grad_student, x_base, x_student, weight, has_bias,
                              out_student, stride, (needs[0], needs[1], needs[2], needs[3]))
        return (*grads, None, None)


def _pair(value: Sequence[int] | int) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def traced_adjoined_conv1x1(
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
    """The gemm backend's 1x1 adjoined conv as traceable torch code: under torch.compile
    it appears as aten matmuls. For a conv whose backend is fixed to gemm (it is gemm's
    entry of anfast.ops.conv.TRACEABLE_BACKENDS, hence the signature of
    reference.adjoined_conv2d_reference); raises BackendUnavailable with the reasons when
    the gemm backend cannot run the problem."""
    stride = _pair(stride)
    problem = ConvProblem(x_base, x_student, weight, bias, out_student, stride, _pair(padding),
                          _pair(dilation), groups, student_in_index)
    reasons = BACKEND.unsupported_reasons(problem, explicit=True)
    if reasons:
        raise BackendUnavailable("adjoined_conv2d: backend 'gemm' cannot run this problem: "
                                 + "; ".join(reasons))
    return _AdjoinedConv1x1.apply(x_base, x_student, weight, bias, out_student, stride)
