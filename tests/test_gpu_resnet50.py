"""Every fused backend on every ResNet-50 conv, through the public op, against float64.

torchvision's ResNet-50 adjoined with the paper policy at alpha 4, batch 8: each conv
shape runs ``anfast.ops.adjoined_conv2d(..., backend=NAME)`` in bf16 and fp32, with
channels_last and NCHW inputs, and its outputs and every gradient (both inputs, the
weight, the bias) are compared with torch's convolutions in float64 at the dtype's
tolerance (DESIGN.md section 6). These are the shapes a training run meets, so a
failure here is a backend that `anfast tune` must refuse. GPU only: run first by
benchmarks/gpu_check.sh; skipped without a CUDA device.
"""

import pytest
import torch

import anfast.ops
from anfast.ops import reference
from anfast.ops.dispatch import BackendUnavailable

from helpers import TOLERANCE, assert_close_rel, resnet50_conv_names, resnet50_shapes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FUSED_BACKENDS = ("cuda", "triton")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", resnet50_conv_names())
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backend_matches_float64_on_resnet50_conv(backend, name, dtype, layout):
    s = resnet50_shapes()[name]
    gen = torch.Generator().manual_seed(len(name))
    memory_format = LAYOUTS[layout]

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
    except BackendUnavailable as error:
        pytest.skip(str(error))  # not built here (no extension) or refused with its reasons
    grads = torch.randn_like(y_base), torch.randn_like(y_student)
    torch.autograd.backward((y_base, y_student), grads)

    leaves64 = [t.detach().double().requires_grad_() for t in (x_base, x_student, weight, bias)]
    want = reference.adjoined_conv2d_reference(*leaves64, s["out_student"], (s["stride"],) * 2,
                                               (s["padding"],) * 2)
    torch.autograd.backward(want, tuple(g.double() for g in grads))
    tolerance = TOLERANCE[dtype]
    assert_close_rel(y_base, want[0], tolerance, f"{backend} {name} y_base")
    assert_close_rel(y_student, want[1], tolerance, f"{backend} {name} y_student")
    for what, got, ref in zip(("x_base", "x_student", "weight", "bias"),
                              (x_base, x_student, weight, bias), leaves64):
        assert_close_rel(got.grad, ref.grad, tolerance, f"{backend} {name} grad {what}")
