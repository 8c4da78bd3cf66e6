"""The backends' registry: what a problem is, what a backend is, and why one cannot run.

Each backend states what it supports and, when it cannot run a problem, why not
(xformers-style reasons). Modules are loaded on first use, so the package imports on a
machine without Triton, a GPU or the compiled extension. Choosing among them is
anfast.ops.dispatch's; measuring them is anfast.ops.tuning's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from anfast.ops import reference

__all__ = [
    "BACKEND_PRIORITY",
    "ConvProblem",
    "Backend",
    "TorchBackend",
    "BackendUnavailable",
    "get_backend",
    "backend_reasons",
    "FUSED_DTYPES",
    "fused_kernel_reasons",
    "memory_format",
]

# The fused backends auto may try, then torch. Modules are imported lazily: the package must import on a
# machine without Triton, a GPU or the compiled extension. gemm (1x1 convs through cuBLAS) comes first:
# on a tie with a kernel of ours the library GEMM wins.
BACKEND_PRIORITY = ("gemm", "cuda", "triton", "torch")
_BACKEND_MODULES = {
    "gemm": "anfast.ops.gemm_backend",
    "cuda": "anfast.ops.cuda_backend",
    "triton": "anfast.triton",
    "torch": "anfast.ops.backend",
}


class BackendUnavailable(RuntimeError):
    """Raised when the requested backend (or every backend) cannot run a problem."""


@dataclass(frozen=True)
class ConvProblem:
    """Everything a backend needs to decide whether it can run an adjoined conv."""

    x_base: torch.Tensor
    x_student: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    out_student: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    student_in_index: Optional[torch.Tensor]
    # (x_base, x_student, weight, bias) gradients the backward pass computes; None where
    # the tensors' requires_grad says it (an eager call, before the custom op).
    needs_grad: Optional[tuple[bool, bool, bool, bool]] = None

    @property
    def in_student(self) -> int:
        return self.x_student.shape[1]


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last where ``x`` is (and not also contiguous), else contiguous: the layout
    the op hands a backend each output gradient in, that of the pass's input."""
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class Backend:
    """One implementation of the adjoined conv contract (see anfast.ops.reference).

    Outputs must have the memory format F.conv2d gives for the same inputs
    (channels_last in, channels_last out), since the custom op's fake
    implementation promises exactly that to torch.compile.
    """

    name: str = ""

    def unsupported_reasons(self, problem: ConvProblem, explicit: bool) -> list[str]:
        """Why this backend cannot run ``problem`` (empty when it can).

        ``explicit`` is True when the user asked for this backend by name; a backend
        may accept more then (the Triton interpreter on CPU tensors, say).
        """
        raise NotImplementedError

    def variants(self, problem: ConvProblem) -> list[str]:
        """Names of the kernel variants (tile shapes, ...) the tuner times apart for
        ``problem``; empty for a backend with one way to run it."""
        return []

    def with_variant(self, variant: str) -> "Backend":
        """This backend fixed to one of its variants."""
        raise ValueError(f"backend {self.name!r} has no kernel variants (asked for {variant!r})")

    def forward(self, problem: ConvProblem) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(
        self,
        grad_base: torch.Tensor,
        grad_student: torch.Tensor,
        problem: ConvProblem,
        output_mask: tuple[bool, bool, bool, bool],
    ) -> tuple[Optional[torch.Tensor], ...]:
        """(dx_base, dx_student, dweight, dbias); entries not in output_mask may be None."""
        raise NotImplementedError


class TorchBackend(Backend):
    """The reference: cuDNN / oneDNN convolutions on sliced weights. Runs everything."""

    name = "torch"

    def unsupported_reasons(self, problem: ConvProblem, explicit: bool) -> list[str]:
        return []

    def forward(self, problem: ConvProblem) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.adjoined_conv2d_reference(
            problem.x_base, problem.x_student, problem.weight, problem.bias,
            problem.out_student, problem.stride, problem.padding, problem.dilation,
            problem.groups, problem.student_in_index,
        )

    def backward(self, grad_base, grad_student, problem, output_mask):
        return reference.adjoined_conv2d_backward_reference(
            grad_base, grad_student, problem.x_base, problem.x_student, problem.weight,
            problem.bias is not None, problem.out_student, problem.stride, problem.padding,
            problem.dilation, problem.groups, problem.student_in_index, output_mask,
        )


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_kernel_reasons(problem: ConvProblem, kernels: str,
                         dtypes: tuple[torch.dtype, ...] = FUSED_DTYPES) -> list[str]:
    """What the fused kernels of every backend share: one device and dtype (one of
    ``dtypes``), groups 1, dilation 1, a prefix channel map, equal spatial sizes.
    ``kernels`` names them in the messages ("the cuda kernels")."""
    tensors = {"x_base": problem.x_base, "x_student": problem.x_student, "weight": problem.weight}
    if problem.bias is not None:
        tensors["bias"] = problem.bias
    reasons = []
    if len({t.device for t in tensors.values()}) > 1:
        placed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        reasons.append(f"tensors are on several devices ({placed}); move them to one device")
    if len({t.dtype for t in tensors.values()}) > 1:
        mixed = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        reasons.append(f"inputs mix dtypes ({mixed}); cast x, weight and bias to one dtype")
    elif problem.x_base.dtype not in dtypes:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        reasons.append(f"dtype {problem.x_base.dtype} is not one of {names}")
    if problem.groups != 1:
        reasons.append(f"groups={problem.groups} ({kernels} need groups=1; backend='torch' runs "
                       "grouped convs)")
    if tuple(problem.dilation) != (1, 1):
        reasons.append(f"dilation={tuple(problem.dilation)} ({kernels} need dilation 1; "
                       "backend='torch' runs dilated convs)")
    if problem.student_in_index is not None:
        reasons.append(f"student_in_index is set ({kernels} take the prefix channel map only; "
                       "backend='torch' gathers the weight columns)")
    if problem.x_student.shape[2:] != problem.x_base.shape[2:]:
        reasons.append(f"x_student spatial size {tuple(problem.x_student.shape[2:])} differs from "
                       f"x_base's {tuple(problem.x_base.shape[2:])}")
    return reasons


BACKEND = TorchBackend()
_cache: dict[str, Backend | str] = {}


def get_backend(name: str) -> Backend:
    """The backend object called ``name``; raises BackendUnavailable if it cannot load."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_PRIORITY)}")
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(_BACKEND_MODULES[name]).BACKEND
        except (ImportError, AttributeError) as error:  # triton missing, extension not built
            _cache[name] = f"cannot import {_BACKEND_MODULES[name]}: {error}"
    backend = _cache[name]
    if isinstance(backend, str):
        raise BackendUnavailable(f"backend {name!r} is unavailable: {backend}")
    return backend


def backend_reasons(name: str, problem: ConvProblem, explicit: bool) -> list[str]:
    """Why backend ``name`` cannot run ``problem`` (empty when it can), loading it first."""
    try:
        backend = get_backend(name)
    except BackendUnavailable as error:
        return [str(error)]
    return backend.unsupported_reasons(problem, explicit)
