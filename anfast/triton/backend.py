"""The "triton" backend of anfast.ops.adjoined_conv2d: capability checks and launches."""

from __future__ import annotations

from typing import Optional

import torch

from anfast.ops.backend import Backend, ConvProblem, fused_kernel_reasons
from anfast.triton.dgrad import adjoined_conv2d_dgrad
from anfast.triton.forward import _adjoined_conv_fwd_kernel, adjoined_conv2d_forward
from anfast.triton.tuning import is_interpreted
from anfast.triton.wgrad import adjoined_conv2d_wgrad

__all__ = ["TritonBackend"]

INT32_ELEMENTS = 2**31  # the kernels' offsets are int32 (forward.decode_rows)



class TritonBackend(Backend):
    """Fused Triton kernels: groups 1, dilation 1, prefix channel map, fp32/bf16/fp16."""

    name = "triton"

    def unsupported_reasons(self, problem: ConvProblem, explicit: bool) -> list[str]:
        reasons = fused_kernel_reasons(problem, "the fused kernels")
        largest = max(problem.x_base.numel(), problem.x_student.numel(), problem.weight.numel())
        if largest >= INT32_ELEMENTS:
            reasons.append(
                f"a tensor of {largest} elements: the Triton kernels index in int32 (< 2**31 elements); "
                "use a smaller batch or backend='torch'"
            )
        if problem.x_base.device.type != "cuda":
            if not is_interpreted(_adjoined_conv_fwd_kernel):
                reasons.append(
                    f"{problem.x_base.device.type} tensors need CUDA, or TRITON_INTERPRET=1 set before "
                    "triton is imported (then backend='triton' runs them on the interpreter)"
                )
            elif not explicit:
                reasons.append(
                    "CPU tensors run on the Triton interpreter only when backend='triton' is asked for"
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
