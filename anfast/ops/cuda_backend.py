"""The "cuda" backend of anfast.ops.adjoined_conv2d: the compiled CUDA C++ kernels.

The kernels live in kernels/ (device code: CUTLASS 2.x implicit-GEMM mainloops run
by fused kernels of ours) and are bound in csrc/ as the extension ``anfast._C``,
built by setup.py where nvcc and the pinned nvidia-cutlass headers are found. This
module imports without the extension or a GPU; ``unsupported_reasons`` then says
what is missing.

The kernels come in variants (tile shapes, wgrad split or not; ``anfast._C.variants()``):
the tuner times each per problem (anfast.ops.tuning) and the backend runs the one it
found fastest for that problem, the largest tile where none was measured. Where the
extension was built for sm_90, the 16-bit dtypes have one more: ``SM90A_VARIANT``, the
Hopper-native kernels (CUTLASS 3, TMA + wgmma; kernels/adjoined_conv_sm90a.cu) of the
forward, wgrad and stride-1 dgrad. A phase they refuse for a problem runs the default
tiles' kernel in the same call (``sm90a_fallback_reasons`` says which and why); the
variant is offered only on sm_90 GPUs and where at least one phase runs on sm_90a.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType
from typing import Optional

import torch

from anfast.ops import tuning
from anfast.ops.backend import Backend, ConvProblem, fused_kernel_reasons

__all__ = ["CudaBackend", "BACKEND", "SM90A_VARIANT", "load_extension", "sm90a_fallback_reasons",
           "sm90a_variant_reasons"]

SUPPORTED_KERNEL_SIZES = (1, 3, 5, 7)
# dgrad keeps the divisors of each of the stride_h x stride_w phases (kernels/phase_output_iterator.cuh).
MAX_STRIDE = 4
# The name anfast._C gives its sm_90a kernel variant (csrc/adjoined_conv_api.cpp).
SM90A_VARIANT = "sm90a-tma-wgmma"
# The phases it has sm_90a kernels for (adjoined_conv2d_sm90a_shape_error names each).
SM90A_PHASES = ("forward", "dgrad", "wgrad")
SM90A_MAX_PADDING = 127


@lru_cache(maxsize=None)
def load_extension() -> tuple[Optional[ModuleType], str]:
    """(anfast._C, "") when the extension imports, else (None, why it does not)."""
    try:
        return importlib.import_module("anfast._C"), ""
    except ImportError as error:
        return None, str(error)


@lru_cache(maxsize=None)
def _variant_names() -> dict[str, tuple[str, ...]]:
    """{dtype name: the extension's kernel variants}, empty without the extension."""
    extension, _ = load_extension()
    return {} if extension is None else {dtype: tuple(names) for dtype, names in extension.variants().items()}


def sm90a_fallback_reasons(problem: ConvProblem) -> dict[str, str]:
    """{phase: why the sm_90a kernels leave it to the default 2.x tiles} for ``problem``,
    as the binding decides (adjoined_conv2d_sm90a_shape_error in kernels/adjoined_conv_sm90a.cu):
    every phase when the padding passes TMA im2col's corners (8-bit signed: up to 127);
    the forward with a bias (its epilogue here has none); dgrad at a stride over 1 (CUTLASS
    3 hands the stride to TMA im2col as the forward's, and tests no strided dgrad). Their
    other limits hold for every problem the binding passes on: channels are zero-padded
    to multiples of 8 (TMA's 16-byte rule), groups are 1, wgrad's dW is packed."""
    if max(problem.padding) > SM90A_MAX_PADDING:
        why = f"padding={tuple(problem.padding)} (TMA im2col takes padding up to {SM90A_MAX_PADDING})"
        return {phase: why for phase in SM90A_PHASES}
    fallbacks = {}
    if problem.bias is not None:
        fallbacks["forward"] = "a bias (the sm_90a forward takes none)"
    if max(problem.stride) > 1:
        fallbacks["dgrad"] = (f"stride={tuple(problem.stride)} (the sm_90a dgrad takes stride 1 only: "
                              "CUTLASS 3 tests no strided dgrad)")
    return fallbacks


def sm90a_variant_reasons(problem: ConvProblem) -> list[str]:
    """Why the sm_90a variant cannot run ``problem`` (beyond the backend's own reasons):
    CUTLASS 3's TMA kernels run on sm_90 alone; where every phase falls back to the
    default tiles (``sm90a_fallback_reasons``), the variant would only repeat them."""
    reasons = []
    device = problem.x_base.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        reasons.append(f"{SM90A_VARIANT} runs on sm_90 GPUs only (tensors on {device})")
    fallbacks = sm90a_fallback_reasons(problem)
    if len(fallbacks) == len(SM90A_PHASES):
        reasons += [f"{SM90A_VARIANT} leaves its {phase} to the 2.x tiles: {why}" for phase, why in fallbacks.items()]
    return reasons


def _output_numel(problem: ConvProblem) -> int:
    """Elements of y_base: (N, C_out, H_out, W_out)."""
    n, _, h, w = problem.x_base.shape
    c_out, _, kh, kw = problem.weight.shape
    (sh, sw), (ph, pw) = problem.stride, problem.padding
    return n * c_out * max(0, (h + 2 * ph - kh) // sh + 1) * max(0, (w + 2 * pw - kw) // sw + 1)


class CudaBackend(Backend):
    """Fused CUDA C++ kernels: CUDA tensors, groups 1, dilation 1, prefix channel map,
    kernel sizes 1/3/5/7, stride up to 4, fp32 (SIMT FMA) / bf16 / fp16 (tensor cores),
    sm_80 or newer.

    Args:
        variant: the kernel variant to run ("128x64x32"); "" runs the one the tuner found
            fastest for each problem (anfast.ops.tuning.decided_variant), else the default.
    """

    name = "cuda"

    def __init__(self, variant: str = ""):
        self.variant = variant

    def variants(self, problem: ConvProblem) -> list[str]:
        """The kernel variants the tuner times for ``problem``: its dtype's, the sm_90a one
        only where it runs at least one phase of the problem."""
        names = _variant_names().get(str(problem.x_base.dtype).removeprefix("torch."), ())
        return [name for name in names if name != SM90A_VARIANT or not sm90a_variant_reasons(problem)]

    def with_variant(self, variant: str) -> "CudaBackend":
        """This backend fixed to one kernel variant (what the tuner times and verifies)."""
        return CudaBackend(variant)

    def _variant_for(self, problem: ConvProblem) -> str:
        return self.variant or tuning.decided_variant(problem, self.name)

    def unsupported_reasons(self, problem: ConvProblem, explicit: bool) -> list[str]:
        reasons = []
        extension, import_error = load_extension()
        if extension is None:
            reasons.append(
                f"anfast._C is not built ({import_error}): install with nvcc available and "
                "ANFAST_BUILD_CUDA!=0 (pip install --no-deps --no-build-isolation -e .)"
            )
        if problem.x_base.device.type != "cuda":
            reasons.append(
                f"tensors are on {problem.x_base.device.type}; the cuda backend needs CUDA tensors"
            )
        elif torch.cuda.get_device_capability(problem.x_base.device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(problem.x_base.device)
            reasons.append(f"the GPU is sm_{major}{minor}; the cuda kernels need sm_80 or newer")
        reasons += fused_kernel_reasons(problem, "the cuda kernels")
        kernel_size = tuple(problem.weight.shape[2:])
        if any(k not in SUPPORTED_KERNEL_SIZES for k in kernel_size):
            reasons.append(f"kernel size {kernel_size} (the cuda kernels take 1, 3, 5 or 7 per side)")
        largest = max(problem.x_base.numel(), _output_numel(problem)) * problem.x_base.element_size()
        if largest >= 2**31:
            reasons.append(f"an activation holds {largest / 2**30:.1f} GiB (the cuda kernels use 32-bit "
                           "offsets: under 2 GiB per tensor); split the batch")
        if any(s > MAX_STRIDE for s in problem.stride):
            reasons.append(f"stride={tuple(problem.stride)} (the cuda kernels take strides up to {MAX_STRIDE})")
        if self.variant == SM90A_VARIANT:
            reasons += sm90a_variant_reasons(problem)
        return reasons

    def forward(self, problem: ConvProblem) -> tuple[torch.Tensor, torch.Tensor]:
        extension, _ = load_extension()
        y_base, y_student = extension.forward(
            problem.x_base, problem.x_student, problem.weight, problem.bias, problem.out_student,
            list(problem.stride), list(problem.padding), variant=self._variant_for(problem),
        )
        return y_base, y_student

    def backward(
        self,
        grad_base: torch.Tensor,
        grad_student: torch.Tensor,
        problem: ConvProblem,
        output_mask: tuple[bool, bool, bool, bool],
    ) -> tuple[Optional[torch.Tensor], ...]:
        extension, _ = load_extension()
        need_dx_base, need_dx_student, need_weight, need_bias = output_mask
        conv_args = (problem.x_base, problem.x_student, problem.weight, problem.out_student,
                     list(problem.stride), list(problem.padding))
        variant = self._variant_for(problem)
        dx_base = dx_student = dweight = dbias = None
        if need_dx_base or need_dx_student:
            # One launch computes both; the one not asked for is dropped.
            dx_base, dx_student = extension.dgrad(grad_base, grad_student, *conv_args, variant=variant)
        if need_weight:
            dweight = extension.wgrad(grad_base, grad_student, *conv_args, variant=variant)
        if need_bias and problem.bias is not None:
            # A channel sum is bandwidth-bound and cheap next to the GEMMs: torch does it.
            dbias = grad_base.sum((0, 2, 3), dtype=torch.float32)
            dbias[: problem.out_student] += grad_student.sum((0, 2, 3), dtype=torch.float32)
            dbias = dbias.to(problem.weight.dtype)
        return (dx_base if need_dx_base else None, dx_student if need_dx_student else None,
                dweight, dbias)


BACKEND = CudaBackend()
