"""Every fused backend on every ResNet-50 conv, through the public op, against float64.

torchvision's ResNet-50 adjoined with the paper policy at alpha 4, batch 16: each
distinct conv shape runs ``anfast.ops.adjoined_conv2d(..., backend=NAME)`` in bf16 and fp32, with
channels_last and NCHW inputs, and its outputs and every gradient (both inputs, the
weight, the bias) are compared with torch's convolutions in float64 at the dtype's
tolerance (DESIGN.md section 6). These are the shapes a training run meets, so a
failure here is a backend that `anfast tune` must refuse. A backend may refuse a case
only for a reason it documents (gemm: no 3x3/7x7, padded or NCHW convs; cuda: anfast._C
not built or a GPU before sm_80; triton: not installed), which skips it; any other
refusal fails, and so does a documented refusal that gives a second, undocumented reason.
GPU only: run first by benchmarks/gpu_check.sh; skipped without a CUDA device.
"""

import importlib.util
import json
import os

import pytest
import torch

import anfast.ops
from anfast.ops import reference
from anfast.ops.backend import BackendUnavailable, ConvProblem, backend_reasons
from anfast.ops.cuda_backend import load_extension
from anfast.ops.tuning import relative_error

from helpers import TOLERANCE, assert_close_rel, resnet50_distinct_convs, resnet50_shapes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FUSED_BACKENDS = ("gemm", "cuda", "triton")  # gemm refuses (skips) all but the channels_last 1x1 convs
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
BATCH = 16


def record(**fields) -> None:
    """One JSON line per case into $ANFAST_GPU_CORRECTNESS_LOG (gpu_check.sh collects them
    into a results file; lines are written as cases finish, so a run cut short keeps them)."""
    path = os.environ.get("ANFAST_GPU_CORRECTNESS_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(fields) + "\n")


def legitimate_refusal(backend: str, s: dict, layout: str) -> str | None:
    """Why ``backend`` may refuse conv ``s`` in ``layout``, or None where it claims to run it
    (then a refusal is a bug that a skip would hide: 92 cases each of cuda and triton)."""
    if backend == "gemm":
        if s["kernel"] != 1 or s["padding"] != 0:
            return f"gemm runs 1x1 convs without padding only (kernel {s['kernel']}, padding {s['padding']})"
        if layout != "channels_last":
            return "gemm runs channels_last activations only"
    elif backend == "cuda":
        extension, why = load_extension()
        if extension is None:
            return f"anfast._C is not built ({why})"
        if torch.cuda.get_device_capability() < (8, 0):
            return "the cuda kernels need sm_80 or newer"
    elif backend == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def unexplained_reasons(backend: str, s: dict, layout: str, problem: ConvProblem) -> list[str]:
    """The reasons ``backend`` gives for refusing ``problem`` (conv ``s`` in ``layout``) that
    no documented refusal of this case explains: a skip for a documented reason must not
    hide a second, wrong one. cuda and triton refuse whole (not built, not installed)."""
    if backend != "gemm":
        return []
    allowed = []
    if s["kernel"] != 1:
        allowed.append("kernel size ")
    if s["padding"] != 0:
        allowed.append("padding=")
    if layout != "channels_last":
        allowed += ["x_base is not channels_last", "x_student is not channels_last"]
    return [r for r in backend_reasons(backend, problem, explicit=True) if not r.startswith(tuple(allowed))]


# Slowest-varying first: bf16 channels_last (what training runs) comes before the rest.
@pytest.mark.parametrize("name", resnet50_distinct_convs(BATCH))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backend_matches_float64_on_resnet50_conv(backend, layout, dtype, name):
    s = resnet50_shapes(BATCH)[name]
    gen = torch.Generator().manual_seed(len(name))
    memory_format = LAYOUTS[layout]
    case = dict(backend=backend, layer=name, dtype=str(dtype).replace("torch.", ""), layout=layout, shape=s)

    def rand(*shape):
        t = torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)
        return t.contiguous(memory_format=memory_format) if len(shape) == 4 else t

    x_base = rand(s["batch"], s["in_channels"], s["height"], s["width"]).requires_grad_()
    x_student = rand(s["batch"], s["in_student"], s["height"], s["width"]).requires_grad_()
    weight = rand(s["out_channels"], s["in_channels"], s["kernel"], s["kernel"]).requires_grad_()
    bias = rand(s["out_channels"]).requires_grad_()
    conv = dict(out_student=s["out_student"], stride=s["stride"], padding=s["padding"])
    try:
        y_base, y_student = anfast.ops.adjoined_conv2d(x_base, x_student, weight, bias, **conv,
                                                       backend=backend)
        grads = torch.randn_like(y_base), torch.randn_like(y_student)
        torch.autograd.backward((y_base, y_student), grads)
    except BackendUnavailable as error:
        expected = legitimate_refusal(backend, s, layout)
        problem = ConvProblem(x_base, x_student, weight, bias, s["out_student"], (s["stride"],) * 2,
                              (s["padding"],) * 2, (1, 1), 1, None)
        unexplained = unexplained_reasons(backend, s, layout, problem)
        if expected is None or unexplained:
            record(**case, status="raised", why=f"BackendUnavailable: {error}"[:500])
            pytest.fail(f"{backend} refused {name} ({layout}, {dtype}), a conv it claims to run: "
                        f"{unexplained or error}")
        record(**case, status="unavailable", why=str(error))
        pytest.skip(f"{expected}: {error}")
    except Exception as error:
        record(**case, status="raised", why=f"{type(error).__name__}: {error}"[:500])
        raise

    leaves64 = [t.detach().double().requires_grad_() for t in (x_base, x_student, weight, bias)]
    want = reference.adjoined_conv2d_reference(*leaves64, s["out_student"], (s["stride"],) * 2,
                                               (s["padding"],) * 2)
    torch.autograd.backward(want, tuple(g.double() for g in grads))
    tolerance = TOLERANCE[dtype]
    checks = [("y_base", y_base, want[0]), ("y_student", y_student, want[1])]
    checks += [(f"grad {what}", got.grad, ref.grad) for what, got, ref in
               zip(("x_base", "x_student", "weight", "bias"), (x_base, x_student, weight, bias), leaves64)]
    errors = {what: relative_error(got, ref) for what, got, ref in checks}
    worst = max(errors.values())
    record(**case, status="pass" if worst <= tolerance else "FAIL", tolerance=tolerance,
           worst=worst, errors=errors)
    for what, got, ref in checks:
        assert_close_rel(got, ref, tolerance, f"{backend} {name} {what}")
