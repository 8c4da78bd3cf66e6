"""The gemm backend (1x1 convs as GEMMs on views) against the float64 torch reference.

Odd shapes (batch 3, 13 channels, 7x7 images), stride 1 and 2, students of every
width, through the public op and its autograd, in float32 and float64; launchers
writing into NaN-poisoned buffers; nested students through AdjoinedConv2d; the custom
op's fake strides; the reasons it refuses a problem; the tuner choosing it; and the
traceable form torch.compile sees as aten matmuls.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import anfast
from anfast.ops import BackendUnavailable, ConvProblem, adjoined_conv2d, choose_backend, dispatch, explain, tuning
from anfast.ops import conv as conv_op
from anfast.ops.gemm_backend import (
    BACKEND,
    gemm_dgrad,
    gemm_forward,
    gemm_wgrad,
    traced_adjoined_conv1x1,
)
from anfast.ops.reference import adjoined_conv2d_backward_reference, adjoined_conv2d_reference
from anfast.ops.tuning import Tuner
from helpers import TOLERANCE, FakeTimer, assert_close_rel

CHANNELS, BATCH, SIZE = 13, 3, 7
GRAD_NAMES = ("dx_base", "dx_student", "dweight", "dbias")


def make_tensors(in_student, out_student, dtype=torch.float32, bias=True, stride=1, seed=0):
    """channels_last inputs of a 13 -> 13 channel 1x1 conv on 7x7 images, and output gradients."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        t = torch.randn(*shape, generator=generator, dtype=dtype)
        return t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else t

    size_out = -(-SIZE // stride)
    return dict(
        x_base=randn(BATCH, CHANNELS, SIZE, SIZE), x_student=randn(BATCH, in_student, SIZE, SIZE),
        weight=randn(CHANNELS, CHANNELS, 1, 1), bias=randn(CHANNELS) if bias else None,
        grad_base=randn(BATCH, CHANNELS, size_out, size_out),
        grad_student=randn(BATCH, out_student, size_out, size_out),
    )


def reference(t, out_student, stride):
    """Forward and every gradient of the torch reference in float64."""
    wide = {name: None if v is None else v.double() for name, v in t.items()}
    outputs = adjoined_conv2d_reference(wide["x_base"], wide["x_student"], wide["weight"],
                                        wide["bias"], out_student, stride)
    grads = adjoined_conv2d_backward_reference(
        wide["grad_base"], wide["grad_student"], wide["x_base"], wide["x_student"], wide["weight"],
        t["bias"] is not None, out_student, stride)
    return outputs, grads


@pytest.fixture(params=["traced", "custom_op"])
def op_path(request, monkeypatch):
    """backend="gemm" runs the traceable form (anfast.ops.conv.TRACEABLE_BACKENDS); auto on
    a GPU runs GemmBackend inside the custom op, which this fixture's "custom_op" forces."""
    if request.param == "custom_op":
        traceable = {k: v for k, v in conv_op.TRACEABLE_BACKENDS.items() if k != "gemm"}
        monkeypatch.setattr(conv_op, "TRACEABLE_BACKENDS", traceable)
    return request.param


# Every student width of the 13 channels, in (in_student = w) and out (out_student = 14 - w).
@pytest.mark.parametrize("width", range(1, CHANNELS + 1))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_op_and_every_gradient_match_float64(op_path, dtype, stride, bias, width):
    in_student, out_student = width, CHANNELS + 1 - width
    t = make_tensors(in_student, out_student, dtype, bias, stride)
    leaves = {name: t[name].clone().requires_grad_() for name in ("x_base", "x_student", "weight", "bias")
              if t[name] is not None}
    y_base, y_student = adjoined_conv2d(
        leaves["x_base"], leaves["x_student"], leaves["weight"], leaves.get("bias"),
        out_student=out_student, stride=stride, backend="gemm")
    torch.autograd.backward((y_base, y_student), (t["grad_base"], t["grad_student"]))

    (ref_base, ref_student), ref_grads = reference(t, out_student, stride)
    tolerance = TOLERANCE[dtype]
    assert_close_rel(y_base, ref_base, tolerance, "y_base")
    assert_close_rel(y_student, ref_student, tolerance, "y_student")
    for name, leaf, expected in zip(GRAD_NAMES, ("x_base", "x_student", "weight", "bias"), ref_grads):
        if leaf in leaves:
            assert_close_rel(leaves[leaf].grad, expected, tolerance, name)
            assert leaves[leaf].grad.stride() == leaves[leaf].stride(), name
    # The layout F.conv2d gives in the same dtype (channels_last in, channels_last out).
    same_dtype = adjoined_conv2d_reference(t["x_base"], t["x_student"], t["weight"], t["bias"],
                                           out_student, stride)
    assert (y_base.stride(), y_student.stride()) == tuple(y.stride() for y in same_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [1, 7, CHANNELS])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_op_and_every_gradient_match_float64_on_a_gpu(op_path, dtype, stride, width):
    """cuBLAS's GEMMs through both paths, in the dtypes training runs, against float64
    (the ResNet-50 shapes run in tests/test_gpu_resnet50.py)."""
    in_student, out_student = width, CHANNELS + 1 - width
    t = {name: None if v is None else v.to(device="cuda", dtype=dtype)
         for name, v in make_tensors(in_student, out_student, torch.float32, True, stride, seed=9).items()}
    leaves = {name: t[name].clone().requires_grad_() for name in ("x_base", "x_student", "weight", "bias")}
    y_base, y_student = adjoined_conv2d(*leaves.values(), out_student=out_student, stride=stride, backend="gemm")
    torch.autograd.backward((y_base, y_student), (t["grad_base"], t["grad_student"]))
    (ref_base, ref_student), ref_grads = reference(t, out_student, stride)
    tolerance = TOLERANCE[dtype]
    assert_close_rel(y_base, ref_base, tolerance, "y_base")
    assert_close_rel(y_student, ref_student, tolerance, "y_student")
    for name, leaf, expected in zip(GRAD_NAMES, leaves.values(), ref_grads):
        assert_close_rel(leaf.grad, expected, tolerance, name)
        assert leaf.grad.stride() == leaf.stride(), name
    same_dtype = adjoined_conv2d_reference(t["x_base"], t["x_student"], t["weight"], t["bias"],
                                           out_student, stride)
    assert (y_base.stride(), y_student.stride()) == tuple(y.stride() for y in same_dtype)


@pytest.mark.parametrize("stride", [1, 2])
def test_launchers_write_every_element_of_poisoned_buffers(stride):
    """Each launcher writes into NaN buffers: an element it forgets stays NaN. And it
    returns those buffers: one that ignored out= would pass the NaN check."""
    in_student, out_student = 5, 4
    t = make_tensors(in_student, out_student, bias=True, stride=stride, seed=3)
    (ref_base, ref_student), (ref_dx_base, ref_dx_student, ref_dw, _) = reference(t, out_student, stride)
    poison = lambda like: torch.full_like(like, float("nan"))  # noqa: E731  (keeps like's strides)
    strides = (stride, stride)
    buffers = dict(y_base=poison(t["grad_base"]), y_student=poison(t["grad_student"]),
                   dx_base=poison(t["x_base"]), dx_student=poison(t["x_student"]), dweight=poison(t["weight"]))

    y_base, y_student = gemm_forward(t["x_base"], t["x_student"], t["weight"], t["bias"], out_student,
                                     strides, out=(buffers["y_base"], buffers["y_student"]))
    dx_base = gemm_dgrad(t["grad_base"], t["x_base"], t["weight"], strides, out=buffers["dx_base"])
    dx_student = gemm_dgrad(t["grad_student"], t["x_student"], t["weight"][:out_student, :in_student],
                            strides, out=buffers["dx_student"])
    dweight = gemm_wgrad(t["grad_base"], t["grad_student"], t["x_base"], t["x_student"], t["weight"],
                         strides, out=buffers["dweight"])
    for name, got, want in [("y_base", y_base, ref_base), ("y_student", y_student, ref_student),
                            ("dx_base", dx_base, ref_dx_base), ("dx_student", dx_student, ref_dx_student),
                            ("dweight", dweight, ref_dw)]:
        assert got is buffers[name], f"{name} (stride {stride}): a new tensor, not the out= buffer"
        assert_close_rel(got, want, TOLERANCE[torch.float32], f"{name} (stride {stride})")


@pytest.mark.parametrize("mask", [(False, True, False, False), (True, False, True, True),
                                  (False, False, False, True), (False, False, True, False)])
def test_backward_computes_only_what_the_mask_asks(mask):
    t = make_tensors(6, 3, bias=True, stride=2, seed=5)
    problem = ConvProblem(t["x_base"], t["x_student"], t["weight"], t["bias"], 3, (2, 2), (0, 0),
                          (1, 1), 1, None)
    grads = BACKEND.backward(t["grad_base"], t["grad_student"], problem, mask)
    _, expected = reference(t, 3, 2)
    for need, got, want, name in zip(mask, grads, expected, GRAD_NAMES):
        if need:
            assert_close_rel(got, want, TOLERANCE[torch.float32], name)
        else:
            assert got is None, f"{name} was not asked for but was returned"


def test_backward_takes_output_gradients_of_any_layout():
    """The tuner's output gradients follow torch's float64 outputs, which came back NCHW
    for channels_last inputs on an H200: the backend reads them through a copy."""
    t = make_tensors(5, 4, seed=6)
    problem = ConvProblem(t["x_base"], t["x_student"], t["weight"], t["bias"], 4, (1, 1), (0, 0),
                          (1, 1), 1, None)
    grads = BACKEND.backward(t["grad_base"].contiguous(), t["grad_student"].contiguous(), problem,
                             (True, True, True, True))
    _, expected = reference(t, 4, 1)
    for got, want, name in zip(grads, expected, GRAD_NAMES):
        assert_close_rel(got, want, TOLERANCE[torch.float32], name)


@pytest.mark.parametrize("stride", [1, 2])
def test_nested_students_through_the_adjoined_module(op_path, stride):
    """Students (9, 6, 2) of a 13-channel layer run as two gemm passes, (base, 9) and
    (6, 2), the second on the strided weight view W[:6, :8] as its base weight; every
    gradient meets in the one weight and bias."""
    widths = dict(student_out_channels=(9, 6, 2), student_in_channels=(10, 8, 3))
    conv = anfast.nn.AdjoinedConv2d(CHANNELS, CHANNELS, 1, stride=stride, backend="gemm", **widths)
    wide = anfast.nn.AdjoinedConv2d(CHANNELS, CHANNELS, 1, stride=stride, backend="torch",
                                    dtype=torch.float64, **widths)
    wide.load_state_dict(conv.state_dict())
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(BATCH, c, SIZE, SIZE, generator=generator)
              .contiguous(memory_format=torch.channels_last).requires_grad_()
              for c in (CHANNELS, 10, 8, 3)]
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    with dispatch.recording() as records:
        outputs = conv(*inputs)
    assert [(phase, name) for _, phase, name in records] == [("forward", "gemm")] * 2
    outputs64 = wide(*inputs64)
    grads_out = [torch.randn(y.shape, generator=generator, dtype=torch.float64) for y in outputs64]
    torch.autograd.backward(outputs, [g.float() for g in grads_out])
    torch.autograd.backward(outputs64, grads_out)
    tolerance = TOLERANCE[torch.float32]
    for n, (got, want) in enumerate(zip(outputs, outputs64)):
        assert_close_rel(got, want, tolerance, f"output of network {n}")
    for n, (got, want) in enumerate(zip(inputs, inputs64)):
        assert_close_rel(got.grad, want.grad, tolerance, f"input gradient of network {n}")
    assert_close_rel(conv.weight.grad, wide.weight.grad, tolerance, "dweight")
    assert_close_rel(conv.bias.grad, wide.bias.grad, tolerance, "dbias")


@pytest.mark.parametrize("stride", [1, 2])
def test_fake_implementations_promise_the_real_strides(stride):
    """torch.compile trusts the fake outputs' metadata: opcheck compares it with the
    real gemm outputs of the forward op and of the backward op."""
    t = make_tensors(5, 4, stride=stride, seed=8)
    common = [[stride, stride], [0, 0], [1, 1], 1, "gemm", False]  # requested, chosen by the op
    forward_args = (t["x_base"], t["x_student"], t["weight"], t["bias"], None, 4, *common, [True] * 4)
    torch.library.opcheck(torch.ops.anfast.adjoined_conv2d.default, forward_args,
                          test_utils=("test_schema", "test_faketensor"))
    backward_args = (t["grad_base"], t["grad_student"], t["x_base"], t["x_student"], t["weight"], True,
                     None, 4, *common, [True, True, True, True])
    torch.library.opcheck(torch.ops.anfast.adjoined_conv2d_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def cpu_problem(**overrides) -> ConvProblem:
    t = make_tensors(5, 4)
    fields = dict(x_base=t["x_base"], x_student=t["x_student"], weight=t["weight"], bias=None,
                  out_student=4, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                  student_in_index=None)
    fields.update(overrides)
    return ConvProblem(**fields)


@pytest.mark.parametrize("overrides, reason, fix", [
    (dict(weight=torch.randn(CHANNELS, CHANNELS, 3, 3)), r"kernel size \(3, 3\)", "backend='cuda'"),
    (dict(padding=(1, 1)), r"padding=\(1, 1\)", "use padding=0"),
    (dict(groups=13, weight=torch.randn(CHANNELS, 1, 1, 1)), "groups=13", "backend='torch' runs grouped"),
    (dict(dilation=(2, 2)), r"dilation=\(2, 2\)", "backend='torch' runs dilated"),
    (dict(x_base=torch.randn(BATCH, CHANNELS, SIZE, SIZE)), "x_base is not channels_last",
     r"x_base.contiguous\(memory_format=torch.channels_last\)"),
    (dict(x_student=torch.randn(BATCH, 5, SIZE, SIZE)), "x_student is not channels_last",
     r"x_student.contiguous\(memory_format=torch.channels_last\)"),
    (dict(student_in_index=torch.tensor([0, 2, 4, 6, 8])), "student_in_index is set",
     "backend='torch' gathers"),
    (dict(weight=torch.randn(CHANNELS, CHANNELS, 1, 1, dtype=torch.float64)), "inputs mix dtypes",
     "cast x, weight and bias to one dtype"),
])
def test_unsupported_problems_are_refused_with_the_fix(overrides, reason, fix):
    problem = cpu_problem(**overrides)
    for explicit in (False, True):  # auto and a named gemm refuse alike: there is no copying path
        reasons = "; ".join(BACKEND.unsupported_reasons(problem, explicit))
        assert re.search(f"{reason}.*{fix}", reasons), reasons
    with pytest.raises(BackendUnavailable, match=f"backend 'gemm' cannot run.*{reason}.*{fix}"):
        choose_backend(problem, "gemm")


def test_gpu_resnet50s_allowed_refusals_let_no_other_reason_through():
    """test_gpu_resnet50 skips a gemm refusal with a documented reason (a 3x3 conv, NCHW
    input); its unexplained_reasons must still find a second, undocumented reason in the
    same refusal. Checked here on CPU tensors of the same shapes (gemm runs on the CPU)."""
    from test_gpu_resnet50 import unexplained_reasons

    def problem(kernel, layout, **overrides):
        s = dict(kernel=kernel, padding=kernel // 2)
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x_base, x_student = (torch.randn(2, c, 6, 6).contiguous(memory_format=memory_format) for c in (16, 8))
        fields = dict(x_base=x_base, x_student=x_student, weight=torch.randn(16, 16, kernel, kernel), bias=None,
                      out_student=8, stride=(1, 1), padding=(kernel // 2,) * 2, dilation=(1, 1), groups=1,
                      student_in_index=None)
        return s, layout, ConvProblem(**{**fields, **overrides})

    # Documented: gemm runs no 3x3 (padded) conv and no NCHW input; a 1x1 channels_last runs.
    for kernel, layout in ((3, "channels_last"), (3, "nchw"), (1, "nchw"), (1, "channels_last")):
        assert unexplained_reasons("gemm", *problem(kernel, layout)) == [], (kernel, layout)
    # A second reason in the same refusal is not hidden by the documented one.
    hidden = unexplained_reasons("gemm", *problem(3, "nchw", dilation=(2, 2)))
    assert len(hidden) == 1 and hidden[0].startswith("dilation=(2, 2)"), hidden
    s, _, nchw = problem(1, "nchw")
    assert unexplained_reasons("gemm", s, "channels_last", nchw), "NCHW refused in a channels_last case"
    assert unexplained_reasons("cuda", *problem(3, "nchw")) == []  # refused whole, never per problem


def test_supported_problem_has_no_reasons():
    assert BACKEND.unsupported_reasons(cpu_problem(), explicit=False) == []
    assert BACKEND.unsupported_reasons(cpu_problem(stride=(2, 2)), explicit=False) == []


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A tuner that tunes CPU tensors (the seam of tests/test_tuning.py), cache in tmp_path."""
    monkeypatch.setenv("ANFAST_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("ANFAST_BACKEND", "ANFAST_TUNE", "ANFAST_AUTO_BACKENDS"):
        monkeypatch.delenv(name, raising=False)
    fresh = Tuner(timer=FakeTimer({}), lazy_devices=("cpu",))
    previous = tuning.set_tuner(fresh)
    yield fresh
    tuning.set_tuner(previous)


def _auto_call(t, out_student=4):
    leaves = [t[name].clone().requires_grad_() for name in ("x_base", "x_student", "weight", "bias")]
    y_base, y_student = adjoined_conv2d(*leaves, out_student=out_student)
    (y_base.square().sum() + y_student.sum()).backward()
    return _problem_of(leaves, out_student)


def _problem_of(leaves, out_student):
    return ConvProblem(*leaves, out_student, (1, 1), (0, 0), (1, 1), 1, None)


@pytest.mark.parametrize("gemm_ms, chosen", [(0.5, "gemm"), (1.5, "torch")])
def test_tuner_verifies_gemm_for_real_and_picks_the_faster(tuner, gemm_ms, chosen):
    """gemm is a default candidate: auto verifies its real outputs and gradients against
    float64 and strides against torch, and picks it exactly when it times faster."""
    tuner.timer = FakeTimer({"gemm": gemm_ms, "torch": 1.0})  # cuda is refused on the CPU, untimed
    problem = _auto_call(make_tensors(5, 4, seed=9))
    decision = tuner.lookup(problem)
    gemm = decision.candidates["gemm"]
    assert gemm.verified and gemm.error < TOLERANCE[torch.float32] and gemm.ms == gemm_ms
    assert decision.backend == chosen and tuner.timer.calls == 2
    assert f"auto: {chosen}: " in explain(problem)
    with dispatch.recording() as records:
        _auto_call(make_tensors(5, 4, seed=9))
    assert [name for _, _, name in records] == [chosen, chosen]  # the backward reads the decision


def test_tuner_records_why_gemm_cannot_run_a_3x3_conv(tuner):
    tuner.timer = FakeTimer({"torch": 1.0})
    t = make_tensors(5, 4, seed=10)
    t["weight"] = torch.randn(CHANNELS, CHANNELS, 3, 3)
    leaves = [t[name].clone().requires_grad_() for name in ("x_base", "x_student", "weight", "bias")]
    adjoined_conv2d(*leaves, out_student=4)
    problem = ConvProblem(*leaves, 4, (1, 1), (0, 0), (1, 1), 1, None)
    decision = tuner.lookup(problem)
    assert decision.backend == "torch" and tuner.timer.calls == 1
    assert "unsupported: kernel size (3, 3)" in decision.candidates["gemm"].why


def _recording_backend():
    """An aot_autograd compiler that keeps the forward and backward graphs it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), graphs


def _call_targets(graph_module) -> list[str]:
    return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]


def test_warm_up_tune_pins_gemm_where_it_won(tuner, monkeypatch):
    """anfast train's warm-up on a channels_last ResNet-18: gemm wins its 1x1 shortcut
    convs (the fake timer says so; verification is real), torch the 3x3 ones; both are
    pinned, so the next forward never enters the custom op."""
    from anfast.nn.backends import prepare_backends

    tuner.timer = FakeTimer({"gemm": 0.5, "torch": 1.0})
    an = anfast.adjoin("resnet18", alpha=4, policy="paper", input_size=(3, 32, 32), num_classes=4)
    an = an.to(memory_format=torch.channels_last)
    prepare_backends(an, "auto", 2, 32, None)
    convs = {name: m for name, m in an.named_modules()
             if isinstance(m, anfast.nn.AdjoinedConv2d) and not m.input_shared}
    one_by_one = {name for name, m in convs.items() if m.kernel_size == (1, 1)}
    assert one_by_one == {f"layer{n}.0.downsample.0" for n in (2, 3, 4)}
    assert {name: m.backend for name, m in convs.items()} == {
        name: "gemm" if name in one_by_one else "torch" for name in convs}
    op_calls = []
    original = conv_op._adjoined_conv2d_op
    monkeypatch.setattr(conv_op, "_adjoined_conv2d_op", lambda *args: op_calls.append(1) or original(*args))
    an(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert not op_calls


@pytest.mark.parametrize("stride", [1, 2])
def test_traced_form_compiles_to_aten_matmuls(stride):
    """Dynamo traces the autograd.Function: forward and backward graphs hold aten
    mm / addmm and no anfast custom op, and give the reference's numbers."""
    backend, graphs = _recording_backend()
    t = make_tensors(5, 4, stride=stride, seed=11)
    leaves = [t[name].clone().requires_grad_() for name in ("x_base", "x_student", "weight", "bias")]

    def step(x_base, x_student, weight, bias):
        y_base, y_student = traced_adjoined_conv1x1(x_base, x_student, weight, bias, 4, stride)
        return (y_base * t["grad_base"]).sum() + (y_student * t["grad_student"]).sum()

    torch._dynamo.reset()
    grads = torch.autograd.grad(torch.compile(step, fullgraph=True, backend=backend)(*leaves), leaves)
    ops = {target for graph in graphs for target in _call_targets(graph)}
    assert len(graphs) == 2 and not [op for op in ops if "anfast" in op], ops
    assert {"aten.mm.default", "aten.addmm.default"} <= ops, ops
    _, expected = reference(t, 4, stride)
    for got, want, name in zip(grads, expected, GRAD_NAMES):
        assert_close_rel(got, want, TOLERANCE[torch.float32], f"compiled {name}")


def test_a_conv_fixed_to_gemm_compiles_without_the_custom_op():
    """Decide, then trace: AdjoinedConv2d with backend="gemm" (students 9, 6, 2: two gemm
    passes and a lone plain conv) is one graph with no break; its forward holds one mm /
    addmm per network and no anfast node, its backward no anfast node either."""
    conv = anfast.nn.AdjoinedConv2d(CHANNELS, CHANNELS, 1, stride=2, backend="gemm",
                                    student_out_channels=(9, 6, 2), student_in_channels=(10, 8, 3))
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn(BATCH, c, SIZE, SIZE, generator=generator)
              .contiguous(memory_format=torch.channels_last) for c in (CHANNELS, 10, 8, 3)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(conv)(*inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    torch._dynamo.reset()
    backend, graphs = _recording_backend()
    outputs = torch.compile(conv, fullgraph=True, backend=backend)(*inputs)
    sum(y.square().sum() for y in outputs).backward()
    forward, backward = (_call_targets(graph) for graph in graphs)
    assert not [t for t in forward + backward if t.startswith("anfast.")], forward + backward
    assert sum(t in ("aten.mm.default", "aten.addmm.default") for t in forward) == 4  # 2 passes x 2
    eager = conv(*inputs)
    for n, (got, want) in enumerate(zip(outputs, eager)):
        assert_close_rel(got, want, TOLERANCE[torch.float32], f"compiled output of network {n}")


def test_traced_form_refuses_what_gemm_cannot_run():
    t = make_tensors(5, 4)
    with pytest.raises(BackendUnavailable, match="x_base is not channels_last"):
        traced_adjoined_conv1x1(t["x_base"].contiguous(), t["x_student"], t["weight"], None, 4)


def test_same_layout_as_conv2d_for_one_pixel_images():
    """A 1x1 image is both NCHW- and NHWC-contiguous; the output strides still follow
    F.conv2d for a channels_last input."""
    x = torch.randn(BATCH, CHANNELS, 1, 1).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(CHANNELS, CHANNELS, 1, 1)
    y_base, y_student = adjoined_conv2d(x, x[:, :5].contiguous(memory_format=torch.channels_last), weight,
                                        out_student=4, backend="gemm")
    assert y_base.stride() == F.conv2d(x, weight).stride()
    assert_close_rel(y_student, F.conv2d(x[:, :5], weight[:4, :5]), TOLERANCE[torch.float32], "y_student")
