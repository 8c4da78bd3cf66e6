"""GPU correctness of the CUDA C++ backend (anfast._C) against the float64 reference.

Every output is poisoned with NaN before the kernel runs, so an element the kernel
never wrote fails the test. Two shape sets: odd random sizes (channel counts the
binding must zero-pad for the 16-bit kernels) and every convolution of torchvision's
ResNet-50 adjoined with the paper policy at alpha 4, batch 8; every kernel variant
(tile shape, wgrad split) on the distinct ResNet-50 convs, channels_last; the sm_90a variant
(CUTLASS 3 TMA + wgmma forward, wgrad and stride-1 dgrad) on every ResNet-50 conv, through
the binding and through the backend pinned to it as the tuner pins it, on sm_90 GPUs only.
Skipped without a CUDA device (CPU CI); run first by benchmarks/gpu_check.sh (pytest -m gpu).
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anfast
import anfast.ops
from anfast.ops import reference
from anfast.ops.cuda_backend import BACKEND, SM90A_VARIANT, load_extension

from helpers import (TOLERANCE, assert_close_rel, resnet50_conv_names, resnet50_distinct_convs,
                     resnet50_shapes, shape_id)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

def random_shapes(count: int, seed: int = 0) -> list[dict]:
    """Odd problem sizes: batch 1-3, channels 3-40, spatial 5-17, kernels 1/3/5/7, strides
    1/2, padding 0..k//2, student widths down to 1; plus channel counts spanning several
    64-wide tiles, so tiles past the student width run the base alone."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < count:
        k = rng.choice((1, 3, 5, 7))
        s = dict(batch=rng.randint(1, 3), in_channels=rng.randint(3, 40), out_channels=rng.randint(3, 40),
                 height=rng.randint(5, 17), width=rng.randint(5, 17), kernel=k,
                 stride=rng.choice((1, 2)), padding=rng.randint(0, k // 2))
        if min(s["height"], s["width"]) + 2 * s["padding"] < k:
            continue
        s["in_student"] = rng.choice((1, rng.randint(1, s["in_channels"])))
        s["out_student"] = rng.choice((1, rng.randint(1, s["out_channels"])))
        shapes.append(s)
    shapes.append(dict(batch=2, in_channels=70, out_channels=130, height=9, width=6, kernel=3, stride=2,
                       padding=1, in_student=66, out_student=65))
    shapes.append(dict(batch=1, in_channels=96, out_channels=150, height=7, width=7, kernel=1, stride=1,
                       padding=0, in_student=8, out_student=136))
    return shapes


SHAPES = random_shapes(32)


def make_problem(s: dict, dtype: torch.dtype, seed: int, channels_last: bool = False):
    """CUDA inputs in ``dtype``: every 4-D one channels_last if asked, else mixed memory
    formats by seed."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, channels_last=False):
        t = torch.randn(*shape, generator=gen).to(dtype).cuda()
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    cl = channels_last or seed % 2 == 0
    x_base = rand(s["batch"], s["in_channels"], s["height"], s["width"], channels_last=cl)
    x_student = rand(s["batch"], s["in_student"], s["height"], s["width"], channels_last=cl)
    weight = rand(s["out_channels"], s["in_channels"], s["kernel"], s["kernel"],
                  channels_last=channels_last or seed % 3 == 0)
    bias = rand(s["out_channels"])
    return x_base, x_student, weight, bias


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert_close_rel(actual.detach().cpu(), expected.detach().cpu(), TOLERANCE[dtype], what)


def poisoned_like(shape, like: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device).contiguous(
        memory_format=memory_format)


def check_kernels_against_float64(s: dict, dtype: torch.dtype, seed: int, variant: str = "",
                                  channels_last: bool = False, with_bias: bool = True):
    """forward, dgrad and wgrad of anfast._C (kernel ``variant``; "" the default) vs torch
    in float64 (on the same GPU)."""
    extension, why = load_extension()
    assert extension is not None, why
    x_base, x_student, weight, bias = make_problem(s, dtype, seed=seed, channels_last=channels_last)
    bias = bias if with_bias else None
    stride, padding = [s["stride"]] * 2, [s["padding"]] * 2
    x_b64, x_s64, w64 = (t.double() for t in (x_base, x_student, weight))
    b64 = bias.double() if with_bias else None
    want_y_base, want_y_student = reference.adjoined_conv2d_reference(
        x_b64, x_s64, w64, b64, s["out_student"], stride, padding)

    y_base_out = poisoned_like(want_y_base.shape, x_base, torch.channels_last)
    y_student_out = poisoned_like(want_y_student.shape, x_base)
    y_base, y_student = extension.forward(x_base, x_student, weight, bias, s["out_student"], stride,
                                          padding, y_base_out=y_base_out, y_student_out=y_student_out,
                                          variant=variant)
    assert y_base.data_ptr() == y_base_out.data_ptr() and y_student.data_ptr() == y_student_out.data_ptr()
    assert_close(y_base, want_y_base, dtype, "y_base")
    assert_close(y_student, want_y_student, dtype, "y_student")

    grad_base = torch.randn(want_y_base.shape, device="cuda").to(dtype)
    grad_student = torch.randn(want_y_student.shape, device="cuda").to(dtype)
    want_dx_b, want_dx_s, want_dw, _ = reference.adjoined_conv2d_backward_reference(
        grad_base.double(), grad_student.double(), x_b64, x_s64, w64, with_bias,
        s["out_student"], stride, padding, output_mask=(True, True, True, False))
    conv_args = (x_base, x_student, weight, s["out_student"], stride, padding)
    dx_base_out = poisoned_like(x_base.shape, x_base, torch.channels_last)
    dx_student_out = poisoned_like(x_student.shape, x_base)
    dx_base, dx_student = extension.dgrad(grad_base, grad_student, *conv_args, grad_x_base_out=dx_base_out,
                                          grad_x_student_out=dx_student_out, variant=variant)
    dweight_out = poisoned_like(weight.shape, weight)
    dweight = extension.wgrad(grad_base, grad_student, *conv_args, grad_weight_out=dweight_out, variant=variant)
    # A binding that ignored the *_out buffers would pass the NaN check with tensors of its own.
    assert dx_base.data_ptr() == dx_base_out.data_ptr() and dx_student.data_ptr() == dx_student_out.data_ptr()
    assert dweight.data_ptr() == dweight_out.data_ptr()
    assert_close(dx_base, want_dx_b, dtype, "grad x_base")
    assert_close(dx_student, want_dx_s, dtype, "grad x_student")
    assert_close(dweight, want_dw, dtype, "grad weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("index", range(len(SHAPES)), ids=[shape_id(s) for s in SHAPES])
def test_kernels_match_float64_reference(index, dtype):
    check_kernels_against_float64(SHAPES[index], dtype, seed=index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", resnet50_conv_names())
def test_every_resnet50_conv_matches_float64_reference(name, dtype):
    check_kernels_against_float64(resnet50_shapes()[name], dtype, seed=len(name))


# The one "variant" the parametrized tests get where anfast._C does not load: each of its
# cases fails saying why (check_kernels_against_float64 and check_off_16_bytes assert the
# extension first), where an empty list would collect no case and pass unseen on a GPU.
NOT_BUILT = "anfast._C-not-built"


def kernel_variants(dtype_name: str) -> list[str]:
    """The extension's kernel variants of a dtype; [NOT_BUILT] where it is not built."""
    extension, _ = load_extension()
    return extension.variants()[dtype_name] if extension is not None else [NOT_BUILT]


def on_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", [v for v in kernel_variants("bfloat16") if v != SM90A_VARIANT])
@pytest.mark.parametrize("name", resnet50_distinct_convs())
def test_every_variant_on_resnet50_convs_matches_float64_reference(name, variant, dtype):
    """Each tile variant (16-bit: both dtypes share the list) on the 23 distinct ResNet-50
    convs, channels_last, the outputs and every gradient."""
    check_kernels_against_float64(resnet50_shapes()[name], dtype, seed=len(name), variant=variant,
                                  channels_last=True)


needs_sm90a_build = pytest.mark.skipif(
    SM90A_VARIANT not in kernel_variants("bfloat16"),
    reason="anfast._C was built without the sm_90a kernels (no 90 in ANFAST_CUDA_ARCHS)")
needs_sm90 = pytest.mark.skipif(not on_sm90(), reason="the sm_90a kernels run on sm_90 GPUs only")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", resnet50_conv_names())
@needs_sm90a_build
@needs_sm90
def test_sm90a_variant_on_every_resnet50_conv_matches_float64_reference(name, dtype):
    """The binding's CUTLASS 3 kernels (forward, wgrad, stride-1 dgrad; the 2.x strided
    dgrad behind the stride-2 convs) on all 52 ResNet-50 convs, channels_last, without bias
    (ResNet's convs have none), into poisoned outputs: the outputs and every gradient."""
    check_kernels_against_float64(resnet50_shapes()[name], dtype, seed=len(name), variant=SM90A_VARIANT,
                                  channels_last=True, with_bias=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", resnet50_conv_names())
@needs_sm90a_build
@needs_sm90
def test_sm90a_backend_on_every_resnet50_conv_matches_float64_reference(name, dtype):
    """The cuda backend pinned to the sm_90a variant by Backend.with_variant (as the tuner
    verifies and times it) on all 52 ResNet-50 convs (paper policy, alpha 4), channels_last:
    every phase but a strided dgrad runs on sm_90a, and y, dx base, dx student and dW
    match float64."""
    from anfast.ops.cuda_backend import sm90a_fallback_reasons

    s = resnet50_shapes()[name]
    x_base, x_student, weight, _ = make_problem(s, dtype, seed=len(name), channels_last=True)
    stride, padding = (s["stride"],) * 2, (s["padding"],) * 2
    problem = anfast.ops.ConvProblem(x_base, x_student, weight, None, s["out_student"], stride, padding, (1, 1), 1,
                                     None)
    backend = BACKEND.with_variant(SM90A_VARIANT)
    assert backend.unsupported_reasons(problem, explicit=True) == []
    assert SM90A_VARIANT in BACKEND.variants(problem)
    assert sorted(sm90a_fallback_reasons(problem)) == (["dgrad"] if s["stride"] > 1 else [])

    x_b64, x_s64, w64 = (t.double() for t in (x_base, x_student, weight))
    want_y_base, want_y_student = reference.adjoined_conv2d_reference(x_b64, x_s64, w64, None, s["out_student"],
                                                                      stride, padding)
    y_base, y_student = backend.forward(problem)
    assert_close(y_base, want_y_base, dtype, "y_base")
    assert_close(y_student, want_y_student, dtype, "y_student")
    grad_base = torch.randn(want_y_base.shape, device="cuda").to(dtype)
    grad_student = torch.randn(want_y_student.shape, device="cuda").to(dtype)
    wants = reference.adjoined_conv2d_backward_reference(
        grad_base.double(), grad_student.double(), x_b64, x_s64, w64, False, s["out_student"], stride, padding,
        output_mask=(True, True, True, False))
    grads = backend.backward(grad_base, grad_student, problem, (True, True, True, False))
    for what, got, want in zip(("grad x_base", "grad x_student", "grad weight"), grads, wants):
        assert_close(got, want, dtype, what)


@needs_sm90a_build
def test_sm90a_variant_falls_back_per_phase_and_refuses_other_gpus():
    """On sm_90 a bias (forward) and a stride (dgrad) run those phases on the 2.x tiles in
    the same call, wgrad on sm_90a, all against float64; other GPUs are refused, saying why."""
    extension, why = load_extension()
    assert extension is not None, why
    s = dict(batch=2, in_channels=24, out_channels=40, height=9, width=9, kernel=3, stride=2, padding=1,
             in_student=8, out_student=16)
    x_base, x_student, weight, bias = make_problem(s, torch.bfloat16, seed=0, channels_last=True)
    problem = anfast.ops.ConvProblem(x_base, x_student, weight, bias, s["out_student"], (2, 2), (1, 1), (1, 1), 1,
                                     None)
    if not on_sm90():
        with pytest.raises(RuntimeError, match="runs on sm_90 GPUs only"):
            extension.forward(x_base, x_student, weight, bias, s["out_student"], [2, 2], [1, 1],
                              variant=SM90A_VARIANT)
        assert SM90A_VARIANT not in BACKEND.variants(problem)
        assert BACKEND.with_variant(SM90A_VARIANT).unsupported_reasons(problem, explicit=True)
        return
    assert SM90A_VARIANT in BACKEND.variants(problem)
    check_kernels_against_float64(s, torch.bfloat16, seed=0, variant=SM90A_VARIANT, channels_last=True)


def off_16_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values in a channels_last tensor whose data starts 8 bytes past a
    16-byte boundary: a view into a larger buffer."""
    buffer = torch.empty(tensor.numel() + 8, dtype=tensor.dtype, device=tensor.device)
    offset = next(o for o in range(8) if (buffer.data_ptr() + o * tensor.element_size()) % 16 == 8)
    view = buffer[offset:offset + tensor.numel()].view(tensor.shape)  # 1x1 maps: NCHW is NHWC
    assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() % 16 == 8
    return view.copy_(tensor)


@pytest.mark.parametrize("variant", [v for v in kernel_variants("bfloat16") if v != SM90A_VARIANT or on_sm90()])
def test_tensors_that_start_off_16_bytes_are_copied_not_handed_to_the_kernels(variant):
    """A channels_last tensor need not start on 16 bytes (x[:, 4:20] of an N x 24 x 1 x 1
    map is channels_last-contiguous, 8 bytes in for bf16), where the kernels' 16-byte
    vector loads and TMA descriptors fault: the binding copies such inputs and writes such
    outputs through a scratch tensor. Every input, output and gradient starts 8 bytes in.

    The kernels run in a child process: a fault leaves a CUDA context unusable, and in this
    process (a pytest-xdist worker under gpu_check.sh) it would fail every later test."""
    child = subprocess.run(
        [sys.executable, "-c", f"import test_cuda_ext; test_cuda_ext.check_off_16_bytes({variant!r})"],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=50)  # within gpu_check's 60 s
    assert child.returncode == 0, f"variant {variant}, in a child process:\n{child.stderr[-4000:]}"


def check_off_16_bytes(variant: str) -> None:
    """The kernels of ``variant`` on inputs, outputs and gradients that start 8 bytes past
    16 bytes, against the float64 reference (the test above runs it in a child process)."""
    extension, why = load_extension()
    assert extension is not None, why
    torch.manual_seed(0)
    dtype, batch, channels, out_student = torch.bfloat16, 3, 16, 8
    x_base, grad_base = (off_16_bytes(torch.randn(batch, channels, 1, 1, device="cuda", dtype=dtype))
                         for _ in range(2))
    x_student, grad_student = (off_16_bytes(torch.randn(batch, 8, 1, 1, device="cuda", dtype=dtype))
                               for _ in range(2))
    weight = off_16_bytes(torch.randn(channels, channels, 1, 1, device="cuda", dtype=dtype))
    bias = torch.randn(channels + 4, device="cuda", dtype=dtype)[4:]  # 8 bytes in
    conv_args = (x_base, x_student, weight, out_student, [1, 1], [0, 0])
    nan = lambda t: off_16_bytes(torch.full_like(t, float("nan")))  # noqa: E731

    x_b64, x_s64, w64 = (t.double() for t in (x_base, x_student, weight))
    want = reference.adjoined_conv2d_reference(x_b64, x_s64, w64, bias.double(), out_student, 1, 0)
    want_grads = reference.adjoined_conv2d_backward_reference(
        grad_base.double(), grad_student.double(), x_b64, x_s64, w64, True, out_student, 1, 0,
        output_mask=(True, True, True, False))
    outs = dict(y_base=nan(grad_base), y_student=nan(grad_student), dx_base=nan(x_base),
                dx_student=nan(x_student), dweight=nan(weight))
    y_base, y_student = extension.forward(x_base, x_student, weight, bias, out_student, [1, 1], [0, 0],
                                          y_base_out=outs["y_base"], y_student_out=outs["y_student"],
                                          variant=variant)
    dx_base, dx_student = extension.dgrad(grad_base, grad_student, *conv_args, grad_x_base_out=outs["dx_base"],
                                          grad_x_student_out=outs["dx_student"], variant=variant)
    dweight = extension.wgrad(grad_base, grad_student, *conv_args, grad_weight_out=outs["dweight"],
                              variant=variant)
    torch.cuda.synchronize()
    for name, got, expected in (("y_base", y_base, want[0]), ("y_student", y_student, want[1]),
                                ("dx_base", dx_base, want_grads[0]),
                                ("dx_student", dx_student, want_grads[1]), ("dweight", dweight, want_grads[2])):
        # The scratch tensor's values must come back into the given (unaligned) buffer.
        assert got.data_ptr() == outs[name].data_ptr(), f"{name}: not written into its *_out buffer"
        assert_close(got, expected, dtype, name)


@pytest.mark.parametrize("variant", kernel_variants("float32"))
@pytest.mark.parametrize("index", [0, 5, len(SHAPES) - 2], ids=lambda i: shape_id(SHAPES[i]))
def test_every_fp32_variant_matches_float64_reference(index, variant):
    check_kernels_against_float64(SHAPES[index], torch.float32, seed=index, variant=variant)


def test_an_unknown_variant_is_refused_with_the_choices():
    extension, why = load_extension()
    assert extension is not None, why
    x_base, x_student, weight, bias = make_problem(SHAPES[0], torch.bfloat16, seed=0)
    with pytest.raises(RuntimeError, match=r"variant '256x256x32' is not a BFloat16 kernel variant; "
                                           r"choose one of 128x128x32, 128x128x32-unsplit, "):
        extension.forward(x_base, x_student, weight, bias, SHAPES[0]["out_student"], [1, 1], [1, 1],
                          variant="256x256x32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", [0, 5, len(SHAPES) - 2], ids=lambda i: shape_id(SHAPES[i]))
def test_custom_op_autograd_on_cuda_backend(index, dtype):
    """The public op with backend='cuda': outputs, every gradient (bias too), output layout."""
    s = SHAPES[index]
    x_base, x_student, weight, bias = (t.requires_grad_() for t in make_problem(s, dtype, seed=100 + index))
    stride, padding = s["stride"], s["padding"]
    y_base, y_student = anfast.ops.adjoined_conv2d(
        x_base, x_student, weight, bias, out_student=s["out_student"], stride=stride, padding=padding,
        backend="cuda")
    grad_base, grad_student = torch.randn_like(y_base), torch.randn_like(y_student)
    torch.autograd.backward((y_base, y_student), (grad_base, grad_student))

    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (x_base, x_student, weight, bias)]
    want = reference.adjoined_conv2d_reference(*leaves64, s["out_student"], stride, padding)
    torch.autograd.backward(want, (grad_base.double().cpu(), grad_student.double().cpu()))
    expected_layout = torch.nn.functional.conv2d(x_base.detach(), weight.detach(), None, stride, padding)
    expected_format = torch.contiguous_format if expected_layout.is_contiguous() else torch.channels_last
    assert y_base.is_contiguous(memory_format=expected_format), f"y_base must be {expected_format} as F.conv2d's"
    assert_close(y_base, want[0].detach(), dtype, "y_base")
    assert_close(y_student, want[1].detach(), dtype, "y_student")
    for name, got, ref in zip(("x_base", "x_student", "weight", "bias"),
                              (x_base, x_student, weight, bias), leaves64):
        assert_close(got.grad, ref.grad, dtype, f"grad {name}")


def test_auto_dispatch_verifies_the_cuda_backend_and_follows_its_decision(monkeypatch, tmp_path):
    monkeypatch.setenv("ANFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(anfast.ops.tuning, "_tuner", anfast.ops.tuning.Tuner())
    s = SHAPES[1]
    x_base, x_student, weight, bias = make_problem(s, torch.bfloat16, seed=7)
    problem = anfast.ops.ConvProblem(x_base, x_student, weight, bias, s["out_student"],
                                     (s["stride"],) * 2, (s["padding"],) * 2, (1, 1), 1, None)
    assert BACKEND.unsupported_reasons(problem, explicit=False) == []
    (decision, cached), = anfast.ops.tuning.tune_problems([problem], ["cuda"])
    cuda = decision.candidates["cuda"]
    assert cuda.verified, cuda.why
    assert not cached
    # Every variant was verified and timed; the fastest is named and is what the backend runs.
    assert sorted(cuda.variants) == sorted(BACKEND.variants(problem))
    assert cuda.ms == min(r.ms for r in cuda.variants.values() if r.verified)
    assert cuda.variant == anfast.ops.tuning.decided_variant(problem, "cuda")
    assert anfast.ops.choose_backend(problem, "auto").name == decision.backend
