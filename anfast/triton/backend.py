"""The "triton" backend of anfast.ops.adjoined_conv2d: capability checks and launches."""

from __future__ import annotations

from typing import Optional

import torch

from anfast.ops.dispatch import Backend, ConvProblem
from anfast.triton.dgrad import adjoined_conv2d_dgrad
from anfast.triton.forward import _adjoined_conv_fwd_kernel, adjoined_conv2d_forward
from anfast.triton.tuning import is_interpreted
from anfast.triton.wgrad import adjoined_conv2d_wgrad

__all__ = ["TritonBackend"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonBackend(Backend):
    """Fused Triton kernels: groups 1, dilation 1, prefix channel map, fp32/bf16/fp16."""

    name = "triton"

    def unsupported_reasons(self, problem: ConvProblem, explicit: bool) -> list[str]:
        tensors = [problem.x_base, problem.x_student, problem.weight]
        if problem.bias is not None:
            tensors.append(problem.bias)
        reasons = []
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            reasons.append(f"tensors are on several devices ({', '.join(sorted(map(str, devices)))})")
        elif problem.x_base.device.type != "cuda":
            if not is_interpreted(_adjoined_conv_fwd_kernel):
                reasons.append(
                    f"{problem.x_base.device.type} tensors need CUDA, or TRITON_INTERPRET=1 set before "
                    "triton is imported (then backend='triton' runs them on the interpreter)"
                )
            elif not explicit:
                reasons.append(
                    "CPU tensors run on the Triton interpreter only when backend='triton' is asked for"
                )
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            names = ", ".join(sorted(str(d) for d in dtypes))
            reasons.append(f"inputs mix dtypes ({names}); cast x, weight and bias to one dtype")
        elif problem.x_base.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {problem.x_base.dtype} is not one of float32, bfloat16, float16")
        if problem.groups != 1:
            reasons.append(f"groups={problem.groups} (the fused kernels need groups=1)")
        if tuple(problem.dilation) != (1, 1):
            reasons.append(f"dilation={tuple(problem.dilation)} (the fused kernels need dilation 1)")
        if problem.student_in_index is not None:
            reasons.append("student_in_index is set (the fused kernels take the prefix channel map only)")
        if problem.x_student.shape[2:] != problem.x_base.shape[2:]:
            reasons.append(
                f"x_student spatial size {tuple(problem.x_student.shape[2:])} differs from x_base's "
                f"{tuple(problem.x_base.shape[2:])}"
            )
        return reasons

    def forward(self, problem: ConvProblem) -> tuple[torch.Tensor, torch.Tensor]:
        return adjoined_conv2d_forward(
            problem.x_base, problem.x_student, problem.weight, problem.bias, problem.out_student,
            problem.stride, problem.padding,
        )

    def backward(
        self,
        grad_base: torch.Tensor,
        grad_student: torch.Tensor,
        problem: ConvProblem,
        output_mask: tuple[bool, bool, bool, bool],
    ) -> tuple[Optional[torch.Tensor], ...]:
        need_dx_base, need_dx_student, need_weight, need_bias = output_mask
        dx_base, dx_student = adjoined_conv2d_dgrad(
            grad_base, grad_student, problem.x_base, problem.x_student, problem.weight,
            problem.stride, problem.padding, need_base=need_dx_base, need_student=need_dx_student,
        )
        dweight = None
        if need_weight:
            dweight = adjoined_conv2d_wgrad(
                grad_base, grad_student, problem.x_base, problem.x_student, problem.weight,
                problem.stride, problem.padding,
            )
        dbias = None
        if need_bias and problem.bias is not None:
            # A channel sum is bandwidth-bound and cheap next to the GEMMs: torch does it.
            dbias = grad_base.sum((0, 2, 3), dtype=torch.float32)
            dbias[: problem.out_student] += grad_student.sum((0, 2, 3), dtype=torch.float32)
            dbias = dbias.to(problem.weight.dtype)
        return dx_base, dx_student, dweight, dbias
