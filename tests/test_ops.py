"""The adjoined conv op on the torch backend: against F.conv2d on sliced weights, float64."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import anfast
from anfast.ops import BackendUnavailable, ConvProblem, adjoined_conv2d, choose_backend

from helpers import assert_close_rel


def _random_case(seed: int):
    rng = random.Random(seed)
    kernel = rng.choice([1, 3, 5, 7])
    groups = rng.choice([1, 1, 1, 2, "depthwise"])
    if groups == "depthwise":
        c_in = c_out = rng.randint(3, 24)
        groups = c_in
        out_student = in_student = rng.randint(1, c_in)
    elif groups == 2:
        c_in, c_out = 2 * rng.randint(2, 12), 2 * rng.randint(2, 12)
        out_student, in_student = c_out // 2, c_in // 2  # one of two whole groups
    else:
        c_in, c_out = rng.randint(3, 40), rng.randint(3, 40)
        in_student, out_student = rng.randint(1, c_in), rng.randint(1, c_out)
    dilation = rng.choice([1, 1, 2])
    return dict(
        batch=rng.randint(1, 3), c_in=c_in, c_out=c_out, in_student=in_student, out_student=out_student,
        size=rng.randint(dilation * (kernel - 1) + 2, 17), kernel=kernel, stride=rng.choice([1, 2]),
        padding=rng.randint(0, kernel // 2), dilation=dilation, groups=groups,
        bias=rng.random() < 0.5,
    )


def _tensors(case, dtype=torch.float64, index=None):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    x_b = make(case["batch"], case["c_in"], case["size"], case["size"])
    x_s = make(case["batch"], case["in_student"], case["size"], case["size"])
    w = make(case["c_out"], case["c_in"] // case["groups"], case["kernel"], case["kernel"])
    b = make(case["c_out"]) if case["bias"] else None
    return x_b, x_s, w, b


@pytest.mark.parametrize("seed", range(40))
def test_reference_matches_conv2d_on_sliced_weights(seed):
    case = _random_case(seed)
    x_b, x_s, w, b = _tensors(case)
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    y_b, y_s = adjoined_conv2d(x_b, x_s, w, b, out_student=case["out_student"], groups=case["groups"],
                               backend="torch", **conv)
    # Independent oracle: two plain convolutions, the student on the hand-sliced weight.
    g_s = case["groups"] * case["out_student"] // case["c_out"] if case["groups"] > 1 else 1
    w_s = w[: case["out_student"]] if case["groups"] > 1 else w[: case["out_student"], : case["in_student"]]
    b_s = b[: case["out_student"]] if b is not None else None
    ref_b = F.conv2d(x_b, w, b, groups=case["groups"], **conv)
    ref_s = F.conv2d(x_s, w_s, b_s, groups=g_s, **conv)
    assert_close_rel(y_b, ref_b, 1e-12, "y_base")
    assert_close_rel(y_s, ref_s, 1e-12, "y_student")

    g_b, g_st = torch.randn_like(y_b), torch.randn_like(y_s)
    params = [t for t in (x_b, x_s, w, b) if t is not None]
    grads = torch.autograd.grad((y_b * g_b).sum() + (y_s * g_st).sum(), params)
    ref_grads = torch.autograd.grad((ref_b * g_b).sum() + (ref_s * g_st).sum(), params)
    for name, got, want in zip(["dx_base", "dx_student", "dweight", "dbias"], grads, ref_grads):
        assert_close_rel(got, want, 1e-12, name)



def _flops(function) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``function()`` and its backward, as torch counts them."""
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        outputs = function()
    with backward:
        sum(y.sum() for y in outputs).backward()
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("seed", range(12))
def test_flop_counter_counts_an_adjoined_conv_as_its_two_convs(seed):
    """FlopCounterMode (so anfast.profile) sees through the custom op: an adjoined conv
    costs what torch's own formulas give for F.conv2d on the base and on the student's
    slice, forward and backward, with the backward counting only the gradients asked."""
    case = _random_case(seed)
    x_b, x_s, w, b = _tensors(case)
    if seed % 3 == 0:
        x_b.requires_grad_(False)  # the first conv of a network: no dgrad for the image
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    g_s = case["groups"] * case["out_student"] // case["c_out"] if case["groups"] > 1 else 1
    w_s = w[: case["out_student"]] if case["groups"] > 1 else w[: case["out_student"], : case["in_student"]]
    b_s = b[: case["out_student"]] if b is not None else None
    got = _flops(lambda: adjoined_conv2d(x_b, x_s, w, b, out_student=case["out_student"],
                                         groups=case["groups"], backend="torch", **conv))
    want = _flops(lambda: (F.conv2d(x_b, w, b, groups=case["groups"], **conv),
                           F.conv2d(x_s, w_s, b_s, groups=g_s, **conv)))
    assert got == want, case


def test_flops_of_an_adjoined_conv_by_hand():
    x_b = torch.randn(2, 6, 8, 8, requires_grad=True)
    x_s = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(10, 6, 3, 3, requires_grad=True)
    forward, backward = _flops(lambda: adjoined_conv2d(x_b, x_s, w, out_student=4, stride=2, padding=1))
    base, student = 2 * 2 * 4 * 4 * 10 * 6 * 9, 2 * 2 * 4 * 4 * 4 * 3 * 9  # 2·N·Ho·Wo·Cout·Cin·k²
    assert forward == base + student
    assert backward == 2 * (base + student)  # dgrad and wgrad, each one forward's worth

def test_gathered_student_input_channels():
    """After a concat the student's channels are named by an index (DenseNet)."""
    x_b = torch.randn(2, 9, 6, 6, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 1, 4, 5, 6])
    x_s = x_b.detach()[:, index].clone().requires_grad_()
    w = torch.randn(7, 9, 3, 3, dtype=torch.float64, requires_grad=True)
    f = lambda x_b, x_s, w: adjoined_conv2d(x_b, x_s, w, out_student=3, padding=1, student_in_index=index)
    assert torch.autograd.gradcheck(f, (x_b, x_s, w))
    _, y_s = f(x_b, x_s, w)
    assert_close_rel(y_s, F.conv2d(x_s, w[:3][:, index], padding=1), 1e-12, "y_student")


def test_weight_gradient_lands_in_one_shared_tensor():
    """dW = base contribution everywhere + student contribution on the leading block."""
    x_b = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    x_s = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y_b, y_s = adjoined_conv2d(x_b, x_s, w, out_student=3)
    (dw,) = torch.autograd.grad(y_s.sum(), w)
    assert dw[3:].abs().sum() == 0 and dw[:, 2:].abs().sum() == 0
    assert dw[:3, :2].abs().sum() > 0


def test_bad_inputs_raise_before_compute():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="out_student=7 must be in"):
        adjoined_conv2d(x, x, w, out_student=7)
    with pytest.raises(ValueError, match="x_student has 5 channels"):
        adjoined_conv2d(x, torch.randn(1, 5, 5, 5), w, out_student=2)
    with pytest.raises(ValueError, match="x_base has 3 channels"):
        adjoined_conv2d(torch.randn(1, 3, 5, 5), x, w, out_student=2)
    with pytest.raises(ValueError, match=r"x_student is \(4, 4\) \(H, W\), x_base \(5, 5\)"):
        adjoined_conv2d(x, torch.randn(1, 2, 4, 4), w, out_student=2)
    with pytest.raises(ValueError, match="x_student has no channels"):
        adjoined_conv2d(x, torch.randn(1, 0, 5, 5), w, out_student=2)
    with pytest.raises(ValueError, match=r"one dtype and device, got x_base torch.float32 on cpu, "
                                         r"x_student torch.float64 on cpu"):
        adjoined_conv2d(x, torch.randn(1, 2, 5, 5, dtype=torch.float64), w, out_student=2)
    with pytest.raises(ValueError, match=r"x_student torch.float32 on meta"):
        adjoined_conv2d(x, torch.randn(1, 2, 5, 5, device="meta"), w, out_student=2)
    with pytest.raises(ValueError, match=r"student_in_index must be an int64 tensor on cpu, got torch.float32"):
        adjoined_conv2d(x, x[:, :2], w, out_student=2, student_in_index=torch.tensor([0.0, 1.0]))


def test_the_drop_in_layer_checks_its_students_widths_and_inputs():
    with pytest.raises(ValueError, match=r"student_in_channels=\(12,\) must be in \[1, 8\]"):
        anfast.nn.AdjoinedConv2d(8, 16, 3, student_in_channels=(12,), student_out_channels=(4,))
    with pytest.raises(ValueError, match="1 student_in_channels for 2 student_out_channels"):
        anfast.nn.AdjoinedConv2d(8, 16, 3, student_in_channels=(4,), student_out_channels=(8, 4))
    conv = anfast.nn.AdjoinedConv2d(8, 16, 3, student_in_channels=(4,), student_out_channels=(8,))
    x = torch.randn(1, 8, 5, 5)
    # A 6-channel student input used to run silently on weight[:8, :6] instead of [:8, :4].
    with pytest.raises(ValueError, match=r"student 0's input has shape \(1, 6, 5, 5\), expected 4 channels"):
        conv(x, torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="0 student inputs for 1 students"):
        conv(x)
    with pytest.raises(ValueError, match="2 student inputs for 1 students"):
        conv(x, x[:, :4], x[:, :4])


def test_the_drop_in_layer_computes_what_conv2d_computes_or_refuses_at_construction():
    """padding_mode, padding="same", whole groups and the backend name are checked when
    the layer is built: a reflect-padded layer used to zero-pad silently, the others to
    fail only at the first call."""
    from anfast.nn import AdjoinedConv2d
    from anfast.nn.backends import set_backend

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"padding_mode='reflect': the adjoined op pads with zeros"):
        AdjoinedConv2d(8, 16, 3, padding=1, padding_mode="reflect", student_in_channels=(4,),
                       student_out_channels=(8,))
    # Reading the image, every network shares the base's conv: reflect is nn.Conv2d's.
    stem = AdjoinedConv2d(8, 16, 3, padding=1, padding_mode="reflect", student_in_channels=(8,),
                          student_out_channels=(8,), input_shared=True).double()
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), stem.weight, stem.bias)
    y_base, y_student = stem(x)
    assert torch.allclose(y_base, reference) and torch.allclose(y_student, reference[:, :8])

    same = AdjoinedConv2d(8, 16, 3, padding="same", dilation=2, student_in_channels=(4,),
                          student_out_channels=(8,)).double()
    y_base, y_student = same(x, x[:, :4])
    assert torch.allclose(y_base, F.conv2d(x, same.weight, same.bias, padding=2, dilation=2))
    assert torch.allclose(y_student, F.conv2d(x[:, :4], same.weight[:8, :4], same.bias[:8], padding=2,
                                              dilation=2))
    with pytest.raises(ValueError, match=r"padding='same' with kernel \(2, 2\).*pads unevenly"):
        AdjoinedConv2d(8, 16, 2, padding="same", student_in_channels=(4,), student_out_channels=(8,))

    # groups=4: 2 input and 4 output channels per group.
    for c_in, c_out in ((4, 10), (6, 8)):
        with pytest.raises(ValueError, match=rf"student 0 has {c_in} input and {c_out} output channels; "
                                             rf"with groups=4 a student keeps whole leading groups"):
            AdjoinedConv2d(8, 16, 3, groups=4, student_in_channels=(c_in,), student_out_channels=(c_out,))
    grouped = AdjoinedConv2d(8, 16, 3, groups=4, student_in_channels=(4,), student_out_channels=(8,)).double()
    y_student = grouped(x, x[:, :4])[1]
    assert torch.allclose(y_student, F.conv2d(x[:, :4], grouped.weight[:8], grouped.bias[:8], groups=2))

    with pytest.raises(ValueError, match=r"backend='cudnn' is no backend; choose one of gemm, cuda, triton, torch"):
        AdjoinedConv2d(8, 16, 3, student_in_channels=(4,), student_out_channels=(8,), backend="cudnn")
    with pytest.raises(ValueError, match=r"backend='trition' is no backend"):
        set_backend(same, "trition")
    set_backend(same, "torch")
    assert same.backend == "torch"
    set_backend(same, "auto")
    assert same.backend is None


def test_named_backend_that_cannot_run_lists_its_reasons(monkeypatch):
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run"):
        adjoined_conv2d(x, x[:, :2], w, out_student=2, backend="cuda")
    monkeypatch.setenv("ANFAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="backend 'cuda'"):
        adjoined_conv2d(x, x[:, :2], w, out_student=2)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        adjoined_conv2d(x, x[:, :2], w, out_student=2, backend="cudnn")


def test_auto_picks_torch_for_cpu_tensors():
    x = torch.randn(1, 4, 5, 5)
    problem = ConvProblem(x, x[:, :2], torch.randn(6, 4, 3, 3), None, 2, (1, 1), (0, 0), (1, 1), 1, None)
    assert choose_backend(problem).name == "torch"


def test_module_under_bf16_autocast_runs_in_bf16():
    conv = anfast.nn.AdjoinedConv2d(4, 6, 3, padding=1, student_out_channels=(3,), student_in_channels=(2,))
    x_b, x_s = torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_b, y_s = conv(x_b, x_s)
    assert y_b.dtype == y_s.dtype == torch.bfloat16
    assert_close_rel(y_s, F.conv2d(x_s, conv.weight[:3, :2], conv.bias[:3], padding=1), 2e-2, "bf16 student")


def test_module_under_autocast_leaves_float64_alone_as_conv2d_does():
    """Autocast never casts float64 (nn.Conv2d stays float64 under it); the layer cast it to bf16."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    layer = anfast.nn.AdjoinedConv2d.from_conv(conv, student_in_channels=(2,), student_out_channels=(3,))
    x_b, x_s = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_b, y_s = layer(x_b, x_s)
        reference = conv(x_b)
    assert reference.dtype == y_b.dtype == y_s.dtype == torch.float64
    torch.testing.assert_close(y_b, reference)
    torch.testing.assert_close(y_s, F.conv2d(x_s, conv.weight[:3, :2], conv.bias[:3], padding=1))


def test_a_reflect_padded_layer_says_what_adjoin_does_with_such_a_conv():
    """The refusal said anfast.adjoin keeps a reflect-padded conv where it reads the image;
    adjoin refuses it there too."""
    with pytest.raises(ValueError, match="anfast.adjoin refuses any padding mode but 'zeros', on the stem too"):
        anfast.nn.AdjoinedConv2d(8, 16, 3, padding=1, padding_mode="reflect", student_in_channels=(4,),
                                 student_out_channels=(8,))
    stem_reflects = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(anfast.AdjoinError, match=r"^0: padding_mode='reflect'"):
        anfast.adjoin(stem_reflects, alpha=2, policy="all", input_size=(3, 6, 6), round_to=4)


@pytest.mark.parametrize("channels_axis", [-1, 1])
def test_adjoined_layer_norm_normalises_each_networks_own_channels_with_every_gradient(channels_axis):
    """Two nested students of 13 channels (7 and 3) on odd shapes: outputs and the gradients
    of input and affine parameters vs F.layer_norm on the sliced parameters in float64,
    the norm over the last axis of (N, H, W, C) or over axis 1 of (N, C, H, W)."""
    from anfast.nn import AdjoinedLayerNorm

    torch.manual_seed(0)
    norm = AdjoinedLayerNorm(13, eps=1e-6, student_features=(7, 3), channels_axis=channels_axis,
                             dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    shape = (3, 5, 7, 13) if channels_axis == -1 else (3, 13, 5, 7)
    base = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    students = [torch.randn(shape, dtype=torch.float64).narrow(channels_axis, 0, c).contiguous().requires_grad_()
                for c in (7, 3)]
    outputs = norm(base, *students)
    grads = [torch.randn_like(y) for y in outputs]
    got = torch.autograd.grad(outputs, (base, *students, norm.weight, norm.bias), grads)

    weight, bias = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    inputs = [x.detach().clone().requires_grad_() for x in (base, *students)]
    def reference(x, width):
        last = x if channels_axis == -1 else x.permute(0, 2, 3, 1)
        y = F.layer_norm(last, (width,), weight[:width], bias[:width], 1e-6)
        return y if channels_axis == -1 else y.permute(0, 3, 1, 2)
    expected = [reference(x, c) for x, c in zip(inputs, (13, 7, 3))]
    want = torch.autograd.grad(expected, (*inputs, weight, bias), grads)
    for y, e in zip(outputs, expected):
        torch.testing.assert_close(y, e, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("base", "student 0", "student 1", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match=r"student 0's input has shape"):
        norm(base, students[1], students[1])
    with pytest.raises(ValueError, match=r"AdjoinedLayerNorm: student_features=\(14,\) must be in \[1, 13\]"):
        AdjoinedLayerNorm(13, student_features=(14,))
    with pytest.raises(ValueError, match=r"AdjoinedLayerNorm: LayerNorm normalises over \(4, 13\)"):
        AdjoinedLayerNorm.from_layernorm(nn.LayerNorm((4, 13)), (7,))


def test_norm_and_linear_check_their_students_as_the_conv_does():
    """zip dropped a missing or extra student input silently, and AdjoinedLinear took
    student widths wider than the base's."""
    from anfast.nn import AdjoinedBatchNorm2d, AdjoinedLinear

    torch.manual_seed(0)
    bn = AdjoinedBatchNorm2d(8, student_features=(4,), dtype=torch.float64)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="AdjoinedBatchNorm2d: 2 student inputs for 1 students"):
        bn(x, x[:, :4], x[:, :2])
    with pytest.raises(ValueError, match="AdjoinedBatchNorm2d: 0 student inputs for 1 students"):
        bn(x)
    with pytest.raises(ValueError, match=r"student 0's input has shape \(3, 6, 4, 4\), expected 4 channels "
                                         r"\(student_features=\(4,\)\)"):
        bn(x, x[:, :6])
    torch.testing.assert_close(bn(x, x[:, :4])[1], nn.BatchNorm2d(4, dtype=torch.float64)(x[:, :4]))

    with pytest.raises(ValueError, match=r"AdjoinedLinear: student_in_features=\(16,\) must be in \[1, 8\]"):
        AdjoinedLinear(8, 4, student_in_features=(16,), student_out_features=(4,))
    with pytest.raises(ValueError, match=r"AdjoinedLinear: student_out_features=\(5,\) must be in \[1, 4\]"):
        AdjoinedLinear(8, 4, student_in_features=(4,), student_out_features=(5,))
    with pytest.raises(ValueError, match="AdjoinedLinear: 1 student_in_features for 2 student_out_features"):
        AdjoinedLinear(8, 4, student_in_features=(4,), student_out_features=(4, 4))
    fc = AdjoinedLinear(8, 4, student_in_features=(4,), student_out_features=(4,), dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="AdjoinedLinear: 0 student inputs for 1 students"):
        fc(x)
    with pytest.raises(ValueError, match="AdjoinedLinear: 2 student inputs for 1 students"):
        fc(x, x[:, :4], x[:, :4])
    with pytest.raises(ValueError, match=r"student 0's input has shape \(3, 6\), expected 4 features"):
        fc(x, x[:, :6])
    torch.testing.assert_close(fc(x, x[:, :4])[1], F.linear(x[:, :4], fc.weight[:, :4], fc.bias))


def test_students_of_a_norm_without_running_statistics_follow_its_dtype():
    """from_batchnorm read the students' dtype from running_mean, None without running
    statistics: a float64 norm's students were made float32 and failed on float64 inputs."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, track_running_stats=False).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    adjoined = anfast.nn.AdjoinedBatchNorm2d.from_batchnorm(bn, [3])
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    y_base, y_student = adjoined(x, x[:, :3])
    reference = nn.BatchNorm2d(3, track_running_stats=False).double()
    reference.load_state_dict({"weight": bn.weight[:3], "bias": bn.bias[:3]})
    assert y_student.dtype == torch.float64
    torch.testing.assert_close(y_base, bn(x))
    torch.testing.assert_close(y_student, reference(x[:, :3]))


def test_shared_affine_students_run_their_own_sync_batchnorm(monkeypatch):
    """With share_affine the students called F.batch_norm themselves, so after
    convert_sync_batchnorm they normalised with each rank's own statistics. Each must run its
    SyncBatchNorm forward with the base's affine slice; in one process that forward falls back
    to batch_norm, so the numbers are nn.BatchNorm2d's."""
    calls = []
    sync_forward = nn.SyncBatchNorm.forward

    def spy(norm, x):
        calls.append((norm.num_features, norm.weight))
        return sync_forward(norm, x)

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", spy)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    adjoined = anfast.nn.convert_sync_batchnorm(
        anfast.nn.AdjoinedBatchNorm2d.from_batchnorm(bn, [4], share_affine=True))
    reference = nn.BatchNorm2d(4).double()
    reference.load_state_dict({"weight": bn.weight[:4], "bias": bn.bias[:4], "running_mean": bn.running_mean[:4],
                               "running_var": bn.running_var[:4], "num_batches_tracked": bn.num_batches_tracked})
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    x_s = torch.randn(3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    y_student = adjoined(x, x_s)[1]
    assert [features for features, _ in calls] == [8, 4]
    assert torch.equal(calls[1][1], bn.weight[:4])
    expected = reference(x_s)
    torch.testing.assert_close(y_student, expected)
    grad = torch.randn_like(expected)
    dx, dweight, dbias = torch.autograd.grad(y_student, (x_s, bn.weight, bn.bias), grad)
    ref_dx, ref_dweight, ref_dbias = torch.autograd.grad(expected, (x_s, reference.weight, reference.bias), grad)
    torch.testing.assert_close(dx, ref_dx)
    torch.testing.assert_close(dweight, torch.cat([ref_dweight, torch.zeros(4, dtype=torch.float64)]))
    torch.testing.assert_close(dbias, torch.cat([ref_dbias, torch.zeros(4, dtype=torch.float64)]))
    student = adjoined.student_norms[0]
    torch.testing.assert_close(student.running_mean, reference.running_mean)
    torch.testing.assert_close(student.running_var, reference.running_var)
    assert int(student.num_batches_tracked) == 1
    adjoined.eval(), reference.eval()
    torch.testing.assert_close(adjoined(x, x_s)[1], reference(x_s))


def test_gradients_have_the_layout_the_fake_implementation_promises():
    """torch.compile trusts the fake strides: real gradients must match them."""
    x_b = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    x_s = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    y_b, y_s = adjoined_conv2d(x_b, x_s, w, out_student=2, padding=1)
    dx_b, dx_s, dw = torch.autograd.grad(y_b.sum() + y_s.sum(), (x_b, x_s, w))
    assert dw.stride() == w.stride() and dx_b.stride() == x_b.stride() and dx_s.stride() == x_s.stride()
