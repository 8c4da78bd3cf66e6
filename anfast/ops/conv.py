"""``adjoined_conv2d``: the public op, a torch.library custom op with autograd.

Path of one call: adjoined_conv2d (checks, then the backend choice, made once in eager
mode) -> anfast::adjoined_conv2d (custom op, one opaque node for torch.compile, told the
chosen backend's name) -> Backend.forward. Backward runs anfast::adjoined_conv2d_backward,
also one node, on the backend the forward ran: the choice travels one way, from the call to
both passes. While torch.compile traces, the choice (which reads the tuning cache and loads
backend modules, nothing dynamo can trace) is left to the op's body, as the requested name
with ``decided=False``: the forward op chooses when it runs, and the backward op reads the
same decision.

Decide, then trace (DESIGN.md section 4c): when the backend is known before the call
looks at the problem (named, $ANFAST_BACKEND, or auto on a device auto does not tune),
and that backend has a traceable form, the call skips the custom op and runs that form:
the torch backend is two aten convolutions on the weight slice, so torch.compile sees
an adjoined conv as plain convolutions and autograd differentiates them natively; the
gemm backend's form is aten matmuls (anfast.ops.gemm_backend.traced_adjoined_conv1x1).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import os

import torch
from torch.utils import flop_counter

from anfast.ops import gemm_backend, reference, tuning
from anfast.ops.backend import ConvProblem, memory_format
from anfast.ops.dispatch import choose_backend, decided_backend, note_choice

__all__ = ["adjoined_conv2d", "fixed_backend_name", "TRACEABLE_BACKENDS"]

# Backends whose work can be written as differentiable torch ops, with the signature of
# reference.adjoined_conv2d_reference. A call fixed to one of these never reaches the
# custom op: torch.compile traces its aten ops and autograd derives the backward pass.
TRACEABLE_BACKENDS = {"torch": reference.adjoined_conv2d_reference,
                      "gemm": gemm_backend.traced_adjoined_conv1x1}


def _problem(x_base, x_student, weight, bias, student_in_index, out_student, stride, padding,
             dilation, groups, needs_grad=None) -> ConvProblem:
    return ConvProblem(
        x_base, x_student, weight, bias, out_student, tuple(stride), tuple(padding),
        tuple(dilation), groups, student_in_index, needs_grad,
    )


# The fused kernels read and write the exact layouts eager mode gives them (channels_last
# in, channels_last out): inductor must hand them those strides, which it then does
# without a copy wherever its producer already writes them. The tag is spelled out
# rather than left to inductor's default for custom ops, which has changed across versions.
_LAYOUT_TAGS = tuple(tag for tag in (getattr(torch.Tag, "needs_exact_strides", None),) if tag is not None)


@torch.library.custom_op("anfast::adjoined_conv2d", mutates_args=(), tags=_LAYOUT_TAGS)
def _adjoined_conv2d_op(
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    student_in_index: Optional[torch.Tensor],
    out_student: int,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    backend: str,
    decided: bool,
    needs_grad: List[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    # needs_grad: which inputs get a gradient, taken before the op (a compiled graph hands
    # its body activations without requires_grad), so the forward pass's decision key is
    # the one eager mode tuned and the backward pass looks up.
    problem = _problem(x_base, x_student, weight, bias, student_in_index, out_student, stride,
                       padding, dilation, groups, tuple(needs_grad))
    return decided_backend(problem, backend, decided, "forward").forward(problem)


@_adjoined_conv2d_op.register_fake
def _(x_base, x_student, weight, bias, student_in_index, out_student, stride, padding, dilation,
      groups, backend, decided, needs_grad):
    # Shapes and memory formats are those of F.conv2d, which every backend must give.
    return reference.adjoined_conv2d_reference(
        x_base, x_student, weight, bias, out_student, stride, padding, dilation, groups,
        student_in_index,
    )


@torch.library.custom_op("anfast::adjoined_conv2d_backward", mutates_args=(), tags=_LAYOUT_TAGS)
def _adjoined_conv2d_backward_op(
    grad_base: torch.Tensor,
    grad_student: torch.Tensor,
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    student_in_index: Optional[torch.Tensor],
    out_student: int,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    backend: str,
    decided: bool,
    output_mask: List[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # A bias stand-in that is never read: backends only look at its presence.
    bias = weight.new_empty(weight.shape[0]) if has_bias else None
    problem = _problem(x_base, x_student, weight, bias, student_in_index, out_student, stride,
                       padding, dilation, groups, tuple(output_mask))
    grads = decided_backend(problem, backend, decided, "backward").backward(
        grad_base, grad_student, problem, tuple(output_mask))
    # Custom ops return tensors only: an empty tensor stands for "not asked for". Each
    # gradient takes its input's layout, as the fake implementation promises (cuDNN
    # returns dW channels_last for channels_last inputs).
    like = (x_base, x_student, weight, bias)
    return tuple(
        weight.new_empty(0) if g is None
        else g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)
        for g, t in zip(grads, like)
    )


@_adjoined_conv2d_backward_op.register_fake
def _(grad_base, grad_student, x_base, x_student, weight, has_bias, student_in_index, out_student,
      stride, padding, dilation, groups, backend, decided, output_mask):
    like = (x_base, x_student, weight, weight.new_empty(weight.shape[0]) if has_bias else None)
    return tuple(
        torch.empty_like(t) if need and t is not None else weight.new_empty(0)
        for t, need in zip(like, output_mask)
    )


def _setup_context(ctx, inputs, output):
    (x_base, x_student, weight, bias, student_in_index, out_student, stride, padding, dilation,
     groups, backend, decided, _) = inputs
    ctx.save_for_backward(x_base, x_student, weight, student_in_index)
    ctx.has_bias = bias is not None
    ctx.config = (out_student, stride, padding, dilation, groups, backend, decided)


def _backward(ctx, grad_base, grad_student):
    x_base, x_student, weight, student_in_index = ctx.saved_tensors
    out_student, stride, padding, dilation, groups, backend, decided = ctx.config
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], needs[2], needs[3] and ctx.has_bias]
    grads = _adjoined_conv2d_backward_op(
        grad_base.contiguous(memory_format=memory_format(x_base)),
        grad_student.contiguous(memory_format=memory_format(x_student)),
        x_base, x_student, weight, ctx.has_bias, student_in_index, out_student, stride, padding,
        dilation, groups, backend, decided, output_mask,
    )
    dx_base, dx_student, dweight, dbias = (g if need else None for g, need in zip(grads, output_mask))
    return dx_base, dx_student, dweight, dbias, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "anfast::adjoined_conv2d", _backward, setup_context=_setup_context
)


# torch.utils.flop_counter sees a custom op as one opaque call: without these formulas
# FlopCounterMode (and anfast.profile) counted no conv FLOPs in an adjoined model. Each
# pass costs what torch's own formulas give F.conv2d on the base and on the student's
# slice of the weight, backward included (torch.utils.flop_counter.conv_backward_flop's
# formulas, which count a grouped conv's wgrad as ``groups`` times its forward).
def _student_weight_shape(x_student, weight, groups, y_student) -> list[int]:
    return [y_student[1], weight[1] if groups != 1 else x_student[1], *weight[2:]]


@flop_counter.register_flop_formula(torch.ops.anfast.adjoined_conv2d)
def _forward_flops(x_base, x_student, weight, bias, student_in_index, out_student, stride, padding,
                   dilation, groups, backend, decided, needs_grad, out_shape) -> int:
    y_base, y_student = out_shape
    student = _student_weight_shape(x_student, weight, groups, y_student)
    return (flop_counter.conv_flop_count(x_base, weight, y_base)
            + flop_counter.conv_flop_count(x_student, student, y_student))


@flop_counter.register_flop_formula(torch.ops.anfast.adjoined_conv2d_backward)
def _backward_flops(grad_base, grad_student, x_base, x_student, weight, has_bias, student_in_index,
                    out_student, stride, padding, dilation, groups, backend, decided, output_mask,
                    out_shape) -> int:
    dx_base, dx_student, dweight, _ = output_mask
    student = _student_weight_shape(x_student, weight, groups, grad_student)
    total = 0
    for grad, x, w, dx in ((grad_base, x_base, weight, dx_base),
                           (grad_student, x_student, student, dx_student)):
        if dx:  # dgrad: the transposed conv of the output gradient with the weight
            total += flop_counter.conv_flop_count(grad, w, x, transposed=True)
        if dweight:  # wgrad: the conv of the input with the output gradient
            total += flop_counter.conv_flop_count(_swap01(x), _swap01(grad), _swap01(w))
    return total


def _swap01(shape) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def _pair(value: Sequence[int] | int, name: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"adjoined_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check(x_base, x_student, weight, bias, out_student, groups, student_in_index):
    if x_base.dim() != 4 or x_student.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            "adjoined_conv2d: x_base, x_student and weight must be 4-D (N, C, H, W) / "
            f"(C_out, C_in/groups, kh, kw); got {tuple(x_base.shape)}, {tuple(x_student.shape)}, "
            f"{tuple(weight.shape)}"
        )
    c_out, c_in_per_group = weight.shape[:2]
    if x_base.shape[1] != c_in_per_group * groups:
        raise ValueError(
            f"adjoined_conv2d: x_base has {x_base.shape[1]} channels but weight expects "
            f"{c_in_per_group * groups} (C_in/groups={c_in_per_group}, groups={groups})"
        )
    if x_student.shape[0] != x_base.shape[0]:
        raise ValueError(
            f"adjoined_conv2d: x_student batch {x_student.shape[0]} != x_base batch {x_base.shape[0]}"
        )
    if x_student.shape[1] < 1:
        raise ValueError("adjoined_conv2d: x_student has no channels; a student reads at least one")
    if x_student.shape[2:] != x_base.shape[2:]:
        raise ValueError(f"adjoined_conv2d: x_student is {tuple(x_student.shape[2:])} (H, W), x_base "
                         f"{tuple(x_base.shape[2:])}; base and student see the same spatial size")
    tensors = {"x_base": x_base, "x_student": x_student, "weight": weight,
               **({"bias": bias} if bias is not None else {})}
    if len({t.device for t in tensors.values()}) > 1 or len({t.dtype for t in tensors.values()}) > 1:
        found = ", ".join(f"{name} {t.dtype} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"adjoined_conv2d: inputs must share one dtype and device, got {found}; cast and "
                         f"move them together (autocast does it for anfast.nn.AdjoinedConv2d)")
    if student_in_index is not None and (student_in_index.dtype not in (torch.int64, torch.int32)
                                         or student_in_index.device != x_base.device):
        raise ValueError(f"adjoined_conv2d: student_in_index must be an int64 tensor on {x_base.device}, got "
                         f"{student_in_index.dtype} on {student_in_index.device}")
    if not 1 <= out_student <= c_out:
        raise ValueError(f"adjoined_conv2d: out_student={out_student} must be in [1, {c_out}]")
    if student_in_index is not None:
        if groups != 1:
            raise ValueError("adjoined_conv2d: student_in_index needs groups=1")
        if student_in_index.shape != (x_student.shape[1],):
            raise ValueError(
                f"adjoined_conv2d: student_in_index has shape {tuple(student_in_index.shape)}, "
                f"expected ({x_student.shape[1]},), one base channel per student channel"
            )
    elif groups == 1:
        if x_student.shape[1] > c_in_per_group:
            raise ValueError(
                f"adjoined_conv2d: x_student has {x_student.shape[1]} channels, more than the "
                f"base's {c_in_per_group}"
            )
    else:
        g_s = reference.student_groups(weight, groups, out_student)
        if x_student.shape[1] != g_s * c_in_per_group:
            raise ValueError(
                f"adjoined_conv2d: a student with out_student={out_student} keeps {g_s} of "
                f"{groups} groups and needs {g_s * c_in_per_group} input channels, "
                f"x_student has {x_student.shape[1]}"
            )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"adjoined_conv2d: bias must have shape ({c_out},), got {tuple(bias.shape)}")


def fixed_backend_name(requested: Optional[str], device: torch.device) -> Optional[str]:
    """The backend a call runs, when that is known without looking at the problem:
    ``requested`` > $ANFAST_BACKEND > auto, where auto is torch on a device it does not
    tune (the CPU). None where auto decides per problem (a GPU): the custom op does.
    """
    name = requested or os.environ.get("ANFAST_BACKEND", "") or "auto"
    if name != "auto":
        return name
    return None if device.type in tuning.get_tuner().lazy_devices else "torch"


def adjoined_conv2d(
    x_base: torch.Tensor,
    x_student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_student: int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    student_in_index: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and student convolutions of one shared weight, in one call.

    Args:
        x_base: base input, (N, C_in, H, W); channels_last is the fast layout.
        x_student: student input, (N, c_in, H, W) with c_in <= C_in: its channels are
            the base's leading c_in channels, or ``student_in_index`` names them.
        weight: shared weight (C_out, C_in / groups, kh, kw).
        bias: optional shared bias (C_out,); the student uses bias[:out_student].
        out_student: the student's output channels (its leading filters).
        stride, padding, dilation, groups: as in F.conv2d; a grouped student keeps
            whole leading groups.
        student_in_index: (c_in,) int64 base channel of each student input channel,
            for a non-prefix channel map (after a concat).
        backend: "gemm", "cuda", "triton", "torch" or "auto"; default $ANFAST_BACKEND, else
            auto: torch on the CPU, on a GPU the fastest backend verified and timed
            against torch on this problem (anfast.ops.tuning). A named backend that
            cannot run raises.

    Returns:
        (y_base, y_student), shaped as F.conv2d's outputs.
    """
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    _check(x_base, x_student, weight, bias, out_student, groups, student_in_index)
    # Under no_grad (an evaluation) autograd records nothing and no backward pass comes:
    # the problem needs no gradients whatever its tensors' requires_grad, so auto's key
    # (tuning.problem_key) times the forward pass alone.
    needs_grad = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                       for t in (x_base, x_student, weight, bias))
    problem = _problem(x_base, x_student, weight, bias, student_in_index, out_student, stride,
                       padding, dilation, groups, needs_grad)
    name = fixed_backend_name(backend, x_base.device)
    if name in TRACEABLE_BACKENDS:
        # Each traceable form refuses what its backend cannot run (torch runs everything
        # the checks above let through), so the backend's reasons are asked once.
        note_choice(problem, "forward", name)
        return TRACEABLE_BACKENDS[name](x_base, x_student, weight, bias, out_student, stride,
                                        padding, dilation, groups, student_in_index)
    if torch.compiler.is_compiling():  # the op's body chooses when it runs
        name, decided = backend or "", False
    else:
        name, decided = choose_backend(problem, backend or "").name, True
    return _adjoined_conv2d_op(
        x_base, x_student, weight, bias, student_in_index, out_student, stride, padding,
        dilation, groups, name, decided, list(tuning.grad_mask(problem)),
    )
