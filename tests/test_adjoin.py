"""adjoin(): torchvision models and a hand-written CNN, base/student semantics, errors."""

import copy
import json
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import anfast
from anfast.adjoin import AdjoinError, student_width
from anfast.nn.reduction import StudentReduction

from helpers import assert_close_rel, hand_student_width

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "mobilenet_v2",
    "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121", "convnext_tiny",
]
SIZE = (3, 32, 32)


class SmallCNN(nn.Module):
    """Every channel rule at once: stem, concat, residual add, depthwise conv, SE-style gate."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 24, 3, padding=1)
        self.mix_bn = nn.BatchNorm2d(32)
        self.mix = nn.Conv2d(32, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16 * 4, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        y = self.mix(F.relu(self.mix_bn(y))) + x
        y = self.depthwise(y)
        y = y * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))


def _check_network(model, an, x):
    model.eval(), an.eval()
    with torch.no_grad():
        out = an(x)
        reference = model(x)
        assert out.base.shape == reference.shape
        assert all(s.shape == reference.shape for s in out.students)
        assert (out.base - reference).abs().max() <= 1e-5
        for index in range(an.num_students):
            student = anfast.export_student(an, index).eval()
            assert (student(x) - out.students[index]).abs().max() <= 1e-5
            assert anfast.count_parameters(student) < anfast.count_parameters(model)


# Student widths at alpha 4, round_to 8, by hand: round ceil(C / 4) up to a multiple of 8
# (of lcm(8, channels per conv group) for grouped convs), at most C.
HAND_WIDTHS = {
    "resnet18": {"layer4.0.conv1": 128},  # 512 / 4 = 128
    "resnet50": {"layer3.0.conv3": 256},  # 1024 / 4 = 256
    # 1024 channels in 32 groups of 32: 1024 / 4 = 256 = 8 whole groups
    "resnext50_32x4d": {"layer4.0.conv2": 256},
    "wide_resnet50_2": {"layer1.0.conv1": 32},  # 128 / 4 = 32
    "vgg11_bn": {"classifier.0": 1024},  # 4096 / 4 = 1024
    "mobilenet_v2": {"features.3.conv.0.0": 40},  # 144 / 4 = 36 -> 40
    # 88 / 4 = 22 -> 24; 40 / 4 = 10 -> 16
    "mobilenet_v3_small": {"features.3.block.0.0": 24, "features.4.block.3.0": 16},
    # 112 / 4 = 28 -> 32; 4 / 4 = 1 -> 8, capped at 4; 6 / 4 = 1.5 -> 2 -> 8, capped at 6
    "efficientnet_b0": {"features.5.0.block.3.0": 32, "features.2.0.block.2.fc1": 4,
                        "features.2.1.block.2.fc1": 6},
    # 440 / 4 = 110 -> 112; 110 / 4 = 27.5 -> 28 -> 32
    "regnet_y_400mf": {"trunk_output.block4.block4-0.f.a.0": 112, "trunk_output.block4.block4-1.f.se.fc1": 32},
    "densenet121": {"features.denseblock1.denselayer1.conv2": 8},  # 32 / 4 = 8
    # The residual stream through torchvision's LayerNorm2d (stem, downsampling, head): 96 / 4 = 24,
    # 384 / 4 = 96; the blocks' hidden Linear 3072 / 4 = 768.
    "convnext_tiny": {"features.1.0.block.0": 24, "features.6.0": 96, "classifier.0": 192,
                      "features.7.0.block.3": 768},
}


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_models(name):
    """Students at alpha 4 match the base's forward and export; their layer widths are the
    hand widths above and round_up(ceil(C / 4), lcm(8, group multiple)) written out here, so a
    wrong student_width (a narrower student, rounding down, no cap at C) fails."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=SIZE)
    _check_network(model, an, torch.randn(2, *SIZE))
    for layer, width in HAND_WIDTHS[name].items():
        assert an.layer_widths[layer].student_out == (width,), f"{layer}: {an.layer_widths[layer].student_out}"
    # Only the image and the logits keep full width (ConvNeXt's (C, 1, 1) layer scales add no group).
    assert [g.fixed for g in an.width_groups if g.fixed] == ["model input", "model output"]
    for layer, widths in an.layer_widths.items():
        group = next(g for g in an.width_groups if g.name == widths.out_group) if widths.out_group != "concat" else None
        if widths.kind == "linear" and layer == list(an.layer_widths)[-1]:
            assert widths.student_out == (widths.out_channels,), f"{layer}: the classifier keeps every class"
        elif widths.kind in ("conv", "linear"):
            step = math.lcm(8, group.multiple)  # round_to 8, whole conv groups
            expected = hand_student_width(widths.out_channels, 4, step)
            assert widths.student_out == (expected,), f"{layer}: {widths.student_out} != {expected}"


def test_student_width_rounds_a_quarter_up_to_the_step_and_caps_at_the_channels():
    """Hand values where ceil, the step and the cap matter: rounding down, a wrong alpha, a
    step that ignores multiple= or a width above C fails."""
    assert student_width(33, 4) == 16  # ceil(33 / 4) = 9 -> 16 (floor would give 8)
    assert student_width(10, 4) == 8  # ceil(2.5) = 3 -> 8
    assert student_width(24, 4, 8) == 8  # 6 -> 8
    assert student_width(96, 4, 8, multiple=12) == 24  # 24, a multiple of lcm(8, 12) = 24
    assert student_width(100, 4, 8, multiple=12) == 48  # ceil(25) -> 48, the next multiple of 24
    assert student_width(4, 4) == 4  # 1 -> 8, capped at C = 4
    assert student_width(100, 1.5, 4) == 68  # ceil(66.7) = 67 -> 68
    assert student_width(37, 1) == 37  # alpha 1 keeps C, not rounded


def test_paper_policy_on_resnet50_keeps_stem_and_layer1():
    an = anfast.adjoin("resnet50", alpha=4, policy="paper", num_classes=10, input_size=SIZE)
    for name, widths in an.layer_widths.items():
        if widths.kind != "conv":
            continue
        full = name == "conv1" or name.startswith("layer1.")
        assert widths.student_out == ((widths.out_channels,) if full else (widths.out_channels // 4,)), name
    assert an.layer_widths["fc"].student_in == (512,)
    assert an.layer_widths["fc"].student_out == (10,)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "densenet121"])
def test_paper_policy_shrinks_only_convs_over_64_channels(name):
    """Convs with min(in, out) <= 64 keep full width, and a conv whose width group is produced
    only by convs with min(in, out) > 64 shrinks to round_up(ceil(C / 4), 8); each model has
    such a conv with 64 < min <= 127, so a threshold above 64 fails, as does one below."""
    def over_64(module):
        return isinstance(module, nn.Conv2d) and min(module.in_channels, module.out_channels) > 64

    model = torchvision.models.get_model(name, num_classes=10)
    an = anfast.adjoin(model, alpha=4, policy="paper", input_size=SIZE)
    groups = {group.name: group for group in an.width_groups}
    shrunk_near_64 = []
    for layer, widths in an.layer_widths.items():
        module = model.get_submodule(layer)
        if widths.kind == "conv" and not over_64(module):
            assert widths.student_out == (widths.out_channels,), f"{layer} must stay full width"
        group = groups.get(widths.out_group)
        if widths.kind == "conv" and group is not None and not group.fixed and all(
                over_64(model.get_submodule(producer)) for producer in group.producers):
            assert group.multiple == 1, f"{layer}: a grouped conv; the hand width below assumes none"
            expected = hand_student_width(widths.out_channels, 4, 8)
            assert widths.student_out == (expected,), f"{layer} must shrink to {expected}: {widths.student_out}"
            if min(module.in_channels, module.out_channels) <= 127:
                shrunk_near_64.append(layer)
    assert shrunk_near_64, "no conv with 64 < min(in, out) <= 127 checked"
    _check_network(model, an, torch.randn(2, *SIZE))


def test_residual_groups_share_one_width():
    an = anfast.adjoin("resnet50", alpha=4, policy="paper", num_classes=10, input_size=SIZE)
    for stage in ("layer2", "layer3", "layer4"):
        widths = {an.layer_widths[f"{stage}.{b}.conv3"].student_out for b in range(2)}
        widths.add(an.layer_widths[f"{stage}.0.downsample.0"].student_out)
        assert len(widths) == 1, f"{stage}: residual stream widths {widths}"


def test_small_cnn_concat_depthwise_gate_and_flatten():
    torch.manual_seed(0)
    model = SmallCNN()
    an = anfast.adjoin(model, alpha=2, policy="all", round_to=4, input_size=(3, 9, 9))
    widths = an.layer_widths
    # concat of 8 + 24 channels: the student keeps 4 of the first part and 12 of the second
    assert widths["mix"].student_in == (16,) and widths["mix"].in_indices[0] is not None
    assert widths["mix"].in_indices[0].tolist() == [0, 1, 2, 3] + list(range(8, 20))
    # residual add and SE gate: stem, mix, depthwise and gate form one group
    assert widths["stem"].student_out == widths["mix"].student_out == widths["gate"].student_out == (8,)
    assert widths["fc"].student_in == (8 * 4,)
    _check_network(model, an, torch.randn(3, 3, 9, 9))


def test_gradients_reach_shared_weights_from_both_networks():
    """float64: d(student loss)/dW equals the exported student's gradient, embedded."""
    torch.manual_seed(0)
    model = SmallCNN().double()
    an = anfast.adjoin(model, alpha=2, policy="all", round_to=4, input_size=(3, 9, 9)).double()
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    out = an(x)
    base_grad = torch.autograd.grad(out.base.square().sum(), an.mix.weight, retain_graph=True)[0]
    student_grad = torch.autograd.grad(out.student.square().sum(), an.mix.weight)[0]
    model.train()
    reference_base = torch.autograd.grad(model(x).square().sum(), model.mix.weight)[0]
    assert_close_rel(base_grad, reference_base, 1e-10, "base grad")
    student = anfast.export_student(an).train()
    reference_student = torch.autograd.grad(student(x).square().sum(), student.mix.weight)[0]
    index = an.layer_widths["mix"].in_indices[0]
    assert_close_rel(student_grad[:8][:, index], reference_student, 1e-10, "student grad")
    mask = torch.ones_like(student_grad, dtype=torch.bool)
    mask[:8, index] = False
    assert student_grad[mask].abs().max() == 0, "the student only touches its own block"
    assert torch.autograd.gradcheck(lambda x: an(x).student, (x.clone().requires_grad_(),), fast_mode=True)


def test_nested_students_are_prefixes():
    torch.manual_seed(0)
    an = anfast.adjoin("resnet18", alpha=(2, 4, 8), policy="all", num_classes=10, input_size=SIZE)
    for name, widths in an.layer_widths.items():
        assert list(widths.student_out) == sorted(widths.student_out, reverse=True), name
    wide, narrow = anfast.export_student(an, 0), anfast.export_student(an, 2)
    w_wide, w_narrow = wide.layer3[0].conv2.weight, narrow.layer3[0].conv2.weight
    assert torch.equal(w_wide[: w_narrow.shape[0], : w_narrow.shape[1]], w_narrow)
    an.eval()
    with torch.no_grad():
        out = an(torch.randn(2, *SIZE))
    assert len(out.students) == 3


def test_torchvision_checkpoint_loads_into_base_and_back():
    model = torchvision.models.resnet18(num_classes=10)
    an = anfast.adjoin(torchvision.models.resnet18(num_classes=10), input_size=SIZE)
    an.load_base_state_dict(model.state_dict())
    base = anfast.export_base(an)
    assert type(base) is type(model)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(base.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_adjoin_does_not_modify_the_input_model():
    model = SmallCNN()
    before = copy.deepcopy(model.state_dict())
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 9, 9))
    an(torch.randn(2, 3, 9, 9))  # train mode: running stats of the adjoined copy move
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert an.stem.weight is not model.stem.weight


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(y)


def test_errors_name_the_module_and_the_fix():
    with pytest.raises(AdjoinError, match="cannot trace DataDependent"):
        anfast.adjoin(DataDependent(), input_size=(3, 8, 8))
    with pytest.raises(AdjoinError, match="alpha=0.5"):
        anfast.adjoin(SmallCNN(), alpha=0.5)
    with pytest.raises(AdjoinError, match="sort the tuple ascending"):
        anfast.adjoin(SmallCNN(), alpha=(4, 2))
    with pytest.raises(AdjoinError, match="policy='half'"):
        anfast.adjoin(SmallCNN(), policy="half", input_size=(3, 9, 9))
    with pytest.raises(AdjoinError, match="not conv or linear layers"):
        anfast.adjoin(SmallCNN(), policy={"stem.conv": 2}, input_size=(3, 9, 9))
    with pytest.raises(AdjoinError, match="fc.*model output"):
        anfast.adjoin(SmallCNN(), policy={"fc": 2}, input_size=(3, 9, 9))
    # A shuffle by view and transpose runs whole: conv keeps full width, and head's output is
    # the model's, so nothing shrinks; the warning says why.
    with pytest.warns(UserWarning, match=r"no layer of ChannelShuffle shrinks.*conv: channels read by view "
                                         r"\(call_method view\), \(2, 8, 8, 8\) -> \(2, 2, 4, 8, 8\), which "
                                         r"anfast cannot follow channels through"):
        anfast.adjoin(ChannelShuffle(), policy="all", input_size=(3, 8, 8))
    with pytest.raises(AdjoinError, match="fails on an input of size"):
        anfast.adjoin(SmallCNN(), input_size=(5, 9, 9))
    with pytest.raises(AdjoinError, match="resnet9000"):
        anfast.adjoin("resnet9000")
    with pytest.raises(AdjoinError, match="alpha=inf"):
        anfast.adjoin(SmallCNN(), alpha=float("inf"))
    with pytest.raises(AdjoinError, match=r"policy for left: alpha \(inf,\) must be finite"):
        anfast.adjoin(SmallCNN(), policy={"left": float("inf")}, input_size=(3, 9, 9))
    # A norm's width follows its conv: naming it would do nothing, so it is refused.
    with pytest.raises(AdjoinError, match=r"policy names \['stem_bn'\], which are not conv or linear"):
        anfast.adjoin(SmallCNN(), policy={"stem_bn": 2}, input_size=(3, 9, 9))
    with pytest.raises(AdjoinError, match="fc.*model output"):  # True is "shrink", not alpha 1
        anfast.adjoin(SmallCNN(), policy={"fc": True}, input_size=(3, 9, 9))
    with pytest.raises(AdjoinError, match=r"padding='same' with kernel \(2, 2\) .* pads unevenly"):
        anfast.adjoin(nn.Sequential(nn.Conv2d(3, 8, 2, padding="same"), nn.Conv2d(8, 4, 1)),
                      input_size=(3, 8, 8))


class _Split(nn.Module):
    """Each failure mode of test_errors_say_what_they_found: a gate on half the channels
    split off by a reshape, a per-channel parameter."""

    def __init__(self, gated: bool):
        super().__init__()
        self.gated, self.a, self.b = gated, nn.Conv2d(3, 128, 3), nn.Conv2d(64 if gated else 128, 4, 1)
        self.p = nn.Parameter(torch.ones(1, 128, 6, 6))  # per channel and position: no student slice

    def forward(self, x):
        if self.gated:
            y1, y2 = self.a(x).unflatten(1, (2, 64)).unbind(1)
            return self.b(y1 * torch.sigmoid(y2))
        return self.b(self.a(x) + self.p)


def test_errors_say_what_they_found():
    """Types a user may hand in (numpy / torch scalars, strings from a config) and layers
    anfast cannot adjoin get errors that say what was found, not what was not."""
    import numpy as np
    from anfast.dan import SearchSpace
    from anfast.dan import DanError

    assert anfast.adjoin(SmallCNN(), alpha=np.float32(4), policy="all", input_size=(3, 9, 9)).alphas == (4.0,)
    with pytest.raises(AdjoinError, match=r"alpha=tensor\(4.\): give a number >= 1"):
        anfast.adjoin(SmallCNN(), alpha=torch.tensor(4.0), input_size=(3, 9, 9))
    for policy, found in ((lambda name, module: "x", "'x'"), ({"left": "2"}, "'2'")):
        with pytest.raises(AdjoinError, match=rf"policy for \w+: {found} is not an alpha; give a number >= 1"):
            anfast.adjoin(SmallCNN(), policy=policy, input_size=(3, 9, 9))
    with pytest.raises(AdjoinError, match="0: Conv1d is not supported; anfast adjoins Conv2d"):
        anfast.adjoin(nn.Sequential(nn.Conv1d(3, 128, 3), nn.Conv1d(128, 4, 1)), input_size=(3, 16))
    with pytest.warns(UserWarning, match=r"\(a: channels read by unflatten \(call_method unflatten\), "
                                         r"\(2, 128, 6, 6\) -> \(2, 2, 64, 6, 6\), which anfast cannot follow"):
        anfast.adjoin(_Split(gated=True), policy="all", input_size=(3, 8, 8))
    with pytest.raises(AdjoinError, match="shrink a, but its channels are the parameter / buffer p"):
        anfast.adjoin(_Split(gated=False), policy={"a": 4}, input_size=(3, 8, 8))
    for alpha in (float("inf"), -2, float("nan")):
        with pytest.raises(ValueError, match=rf"alpha={alpha}: give a finite number >= 1"):
            student_width(64, alpha)
    network = anfast.adjoin(SmallCNN(), alpha=1, policy="all", input_size=(3, 9, 9))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(DanError, match=r"give two or more distinct width divisors >= 1"):
            SearchSpace.from_network(network, choices=(1, bad))


class Reorder(nn.Module):
    """conv a -> an op on its output -> conv b -> head, the op given by name."""

    OPS = {  # name -> (the op, whether it moves channels along axis 1)
        "flip method": (lambda y, m: y.flip(1), True),
        "torch.flip": (lambda y, m: torch.flip(y, [1]), True),
        "torch.roll": (lambda y, m: torch.roll(y, 3, 1), True),
        "roll dims=-3": (lambda y, m: y.roll(1, dims=-3), True),
        "roll, no dims": (lambda y, m: y.roll(5), True),
        "fliplr": (lambda y, m: torch.fliplr(y), True),
        "flip, a dim from forward": (lambda y, m: y.flip(y.dim() - 3), True),
        "index buffer": (lambda y, m: y[:, m.perm], True),
        "index from forward": (lambda y, m: y[:, torch.arange(15, -1, -1)], True),
        "index_select": (lambda y, m: torch.index_select(y, 1, torch.arange(15, -1, -1)), True),
        "scatter": (lambda y, m: torch.zeros_like(y).scatter(1, torch.argsort(y, 1), y), True),
        "ChannelShuffle": (lambda y, m: m.shuffle(y), True),
        "sort along the channels": (lambda y, m: torch.sort(y, dim=1)[0], True),
        "topk of every channel": (lambda y, m: y.topk(16, 1)[0], True),
        # An element of an op's tuple is each network's own (it read the base's).
        "spatial max": (lambda y, m: torch.max(y, dim=3, keepdim=True)[0], False),
        "spatial chunk": (lambda y, m: y.chunk(2, dim=2)[1], False),
        "spatial sort": (lambda y, m: y.sort()[0], False),
        "spatial flip": (lambda y, m: y.flip(3), False),
        "spatial roll": (lambda y, m: torch.roll(y, (1, 2), dims=(2, 3)), False),
        "last-axis index": (lambda y, m: y[..., m.perm_w], False),
    }

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a, self.b, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.shuffle = nn.ChannelShuffle(4)
        self.register_buffer("perm", torch.randperm(16))
        self.register_buffer("perm_w", torch.randperm(8))

    def forward(self, x):
        y = self.OPS[self.op][0](self.a(x), self)
        return self.head(F.relu(self.b(y))).mean((2, 3))


@pytest.mark.parametrize("op", list(Reorder.OPS))
def test_an_op_that_reorders_channels_keeps_them_at_full_width(op, tmp_path):
    """After a flip, roll, gather or shuffle along the channels a student's leading
    channels are not the leading channels before it: they stay at full width. The same
    ops along other axes shrink as usual."""
    torch.manual_seed(0)
    model = Reorder(op).double().eval()
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8)).eval()
    moves = Reorder.OPS[op][1]
    narrow = hand_student_width(16, 4, 8)  # 16 / 4, rounded up to a multiple of 8
    a = 16 if moves else narrow
    assert an.layer_widths["a"].student_out == (a,)
    assert an.layer_widths["b"].student_out == (narrow,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # By hand: the leading `a` filters of a, the op, b's leading filters, head on those.
        y = Reorder.OPS[op][0](F.conv2d(x, model.a.weight[:a], model.a.bias[:a]), model)
        y = F.relu(F.conv2d(y, model.b.weight[:narrow, :a], model.b.bias[:narrow], padding=1))
        expected = F.conv2d(y, model.head.weight[:, :narrow], model.head.bias).mean((2, 3))
        assert (an(x).student - expected).abs().max() <= 1e-12
        student = anfast.export_student(an, path=tmp_path / "student").eval()
        assert (student(x) - expected).abs().max() <= 1e-12
    if moves:
        with pytest.raises(AdjoinError, match=r"policy asks to shrink a, but its channels are the channels that "
                                              r"\S+ .*reorders"):
            anfast.adjoin(model, policy={"a": 2}, input_size=(3, 8, 8))


class InPlaceOnStem(nn.Module):
    """stem (reads the image, so the students share its output) -> an op that writes into
    its input, by name -> conv b -> mean."""

    OPS = {
        "nn.SiLU(inplace=True)": lambda y, m: m.act(y),
        "F.hardswish(inplace=True)": lambda y, m: F.hardswish(y, inplace=True),
        "F.leaky_relu(y, 0.1, True)": lambda y, m: F.leaky_relu(y, 0.1, True),
        "mul_ on a view": lambda y, m: (y.flatten(2).mul_(3), y)[1],
    }

    def __init__(self, op: str):
        super().__init__()
        self.op, self.act = op, nn.SiLU(inplace=True)
        self.stem, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.b(self.OPS[self.op](self.stem(x), self)).mean((2, 3))


@pytest.mark.parametrize("op", list(InPlaceOnStem.OPS))
def test_an_op_in_place_on_the_stems_shared_output_writes_once_per_network(op):
    """The students' stem outputs are views of the base's: an in-place op that each
    network runs once wrote the base's leading channels twice (SiLU applied twice). Base
    and student equal the model and a by-hand student, which apply it once."""
    torch.manual_seed(0)
    model = InPlaceOnStem(op).double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    assert an.layer_widths["stem"].student_out == (8,) and an.layer_widths["stem"].student_in == (3,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        y = InPlaceOnStem.OPS[op](F.conv2d(x, model.stem.weight[:8], model.stem.bias[:8]), model)
        expected = F.conv2d(y, model.b.weight[:, :8], model.b.bias).mean((2, 3))
        assert (out.student - expected).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - expected).abs().max() <= 1e-12


def test_networks_whose_stem_feeds_a_norm_get_no_copies():
    """ResNet's in-place ReLU reads its batch norm's outputs, one tensor per network: the
    adjoined step copies nothing (a copy is made only for a write into a shared tensor)."""
    for arch in ("resnet50", "mobilenet_v2"):
        an = anfast.adjoin(arch, alpha=4, input_size=(3, 32, 32))
        assert not [n for n in an.graph.nodes if n.op == "call_method" and n.target == "clone"], arch


class SliceChannels(nn.Module):
    """conv a -> two slices of its channels, by name -> conv b on the first, and a head
    on b's output concatenated with the second (CSPNet's halves, GhostNet's x[:, :k])."""

    OPS = {  # name -> (the op, the channels of its first slice)
        "torch.split at sizes": (lambda y: torch.split(y, [6, 10], dim=1), 6),
        "split method, dim=-3": (lambda y: y.split([6, 10], -3), 6),
        "split_with_sizes": (lambda y: y.split_with_sizes([6, 10], dim=1), 6),
        "chunk": (lambda y: y.chunk(2, 1), 8),
        "tensor_split": (lambda y: torch.tensor_split(y, (6,), dim=1), 6),
        "narrow": (lambda y: (y.narrow(1, 0, 6), torch.narrow(y, 1, 6, 10)), 6),
        "slices": (lambda y: (y[:, :6], y[:, 6:]), 6),
        "slices after an Ellipsis": (lambda y: (y[..., :6, :, :], y[..., 6:, :, :]), 6),
        "a size from forward": (lambda y: y.split(y.shape[1] // 2, dim=1), 8),
    }

    def __init__(self, op: str):
        super().__init__()
        self.op, first = op, self.OPS[op][1]
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(first, 16, 3, padding=1)
        self.head = nn.Conv2d(16 + 16 - first, 4, 1)

    def forward(self, x):
        first, second = self.OPS[self.op][0](self.a(x))
        return self.head(torch.cat([F.relu(self.b(first)), second], 1)).mean((2, 3))


@pytest.mark.parametrize("op", list(SliceChannels.OPS))
def test_sliced_channels_keep_full_width_and_what_the_slices_compute_shrinks(op, tmp_path):
    """A split or slice of the channels at sizes the model's code fixes (which the
    exported student, the model's own class, runs too): the sliced channels keep full
    width in every network; b, which reads a slice, shrinks its output as usual."""
    torch.manual_seed(0)
    model = SliceChannels(op).double().eval()
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8)).eval()
    narrow, first = hand_student_width(16, 4, 8), SliceChannels.OPS[op][1]
    assert an.layer_widths["a"].student_out == (16,)
    assert an.layer_widths["b"].student_in == (first,) and an.layer_widths["b"].student_out == (narrow,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # By hand: all of a, the slices, b's leading filters; the head reads b's leading
        # channels and all of the second slice.
        y = F.conv2d(x, model.a.weight, model.a.bias)
        y_first, y_second = y[:, :first], y[:, first:]
        z = F.relu(F.conv2d(y_first, model.b.weight[:narrow], model.b.bias[:narrow], padding=1))
        read = list(range(narrow)) + list(range(16, 32 - first))
        expected = F.conv2d(torch.cat([z, y_second], 1), model.head.weight[:, read], model.head.bias).mean((2, 3))
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (an(x).base - model(x)).abs().max() <= 1e-12
        student = anfast.export_student(an, path=tmp_path / "student").eval()
        assert (student(x) - expected).abs().max() <= 1e-12
    with pytest.raises(AdjoinError, match=r"policy asks to shrink a, but its channels are the channels that "
                                          r"\S+ .*slices"):
        anfast.adjoin(model, policy={"a": 2}, input_size=(3, 8, 8))


class EcaGate(nn.Module):
    """conv a -> ECA (Wang et al. 2020: a Conv1d of one channel sliding along the pooled
    channels, spelt as by name) -> conv b -> linear head."""

    SPELLINGS = {  # name -> (the pooled (N, C) map as (N, 1, C), the gate back as (N, C, 1, 1))
        "timm's view": (lambda y: y.view(y.shape[0], 1, -1), lambda g, y: g.view(y.shape[0], -1, 1, 1)),
        "unsqueeze and reshape": (lambda y: y.unsqueeze(1), lambda g, y: g.reshape(y.shape[0], -1, 1, 1)),
        "view back to (N, C)": (lambda y: y.view(y.shape[0], 1, -1), lambda g, y: g.view(y.shape[0], -1)[:, :, None, None]),
    }

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.a, self.b, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        to_sequence, back = self.SPELLINGS[self.spelling]
        y = F.relu(self.a(x))
        gate = back(self.gate(self.eca(to_sequence(y.mean((2, 3)))) * 2), y)
        return self.fc(F.relu(self.b(y * gate.expand_as(y))).mean((2, 3)))


@pytest.mark.parametrize("spelling", list(EcaGate.SPELLINGS))
def test_an_eca_gate_convolves_each_networks_own_channels(spelling, tmp_path):
    """Each network slides ECA's Conv1d along its own pooled channels, its last ones
    next to zero padding, as the exported student (the model's own class) does."""
    torch.manual_seed(0)
    model = EcaGate(spelling).double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    assert an.layer_widths["a"].student_out == an.layer_widths["b"].student_out == (8,)
    # DAN counts the Conv1d's 2 x 3 FLOPs per channel of a (one in, one out channel, kernel 3).
    assert an.channel_ops == {"eca": (("a", 6),)}
    assert [g.reduced_by for g in an.width_groups if g.name == "a"] == [()]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # By hand: a's leading 8 filters, the Conv1d over those 8 pooled channels alone.
        y = F.relu(F.conv2d(x, model.a.weight[:8], model.a.bias[:8], padding=1))
        gate = F.hardsigmoid(2 * F.conv1d(y.mean((2, 3))[:, None], model.eca.weight, padding=1))
        y = F.relu(F.conv2d(y * gate[:, 0, :, None, None], model.b.weight[:8, :8], model.b.bias[:8], padding=1))
        expected = F.linear(y.mean((2, 3)), model.fc.weight[:, :8], model.fc.bias)
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (an(x).base - model(x)).abs().max() <= 1e-12
        student = anfast.export_student(an, path=tmp_path / "student").eval()
        assert (student(x) - expected).abs().max() <= 1e-12


class GlobalContext(nn.Module):
    """conv a -> a GC block (Cao et al. 2019: attention pooling by a matmul, as timm's)
    -> conv b -> linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)
        self.attn, self.mlp1, self.mlp2 = nn.Conv2d(16, 1, 1), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        weights = F.softmax(self.attn(y).reshape(n, 1, h * w), dim=-1).unsqueeze(3)
        context = (y.reshape(n, c, h * w).unsqueeze(1) @ weights).view(n, c, 1, 1)
        y = y * torch.sigmoid(self.mlp2(F.relu(self.mlp1(context))))
        return self.fc(F.relu(self.b(y)).mean((2, 3)))


def test_a_global_context_block_pools_each_networks_own_channels():
    """GC's (N, 1, C, H * W) @ (N, 1, H * W, 1): each network weights the positions of its
    own channels by its own attention map (the attention conv reads the student's leading
    channels), as the exported student does."""
    torch.manual_seed(0)
    model = GlobalContext().double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    assert an.layer_widths["a"].student_out == an.layer_widths["mlp2"].student_out == (8,)
    assert an.channel_ops == {"matmul": (("a", 2 * 8 * 8),)}  # a multiply-add per position of 8 x 8
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # By hand: the student's 8 leading channels, pooled by its own attention map.
        y = F.relu(F.conv2d(x, model.a.weight[:8], model.a.bias[:8], padding=1))
        weights = F.softmax(F.conv2d(y, model.attn.weight[:, :8], model.attn.bias).flatten(1), dim=-1)
        context = torch.einsum("nchw,nhw->nc", y, weights.view(2, 8, 8))[:, :, None, None]
        gate = torch.sigmoid(F.conv2d(F.relu(F.conv2d(context, model.mlp1.weight[:, :8], model.mlp1.bias)),
                                      model.mlp2.weight[:8], model.mlp2.bias[:8]))
        y = F.relu(F.conv2d(y * gate, model.b.weight[:8, :8], model.b.bias[:8], padding=1))
        expected = F.linear(y.mean((2, 3)), model.fc.weight[:, :8], model.fc.bias)
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (an(x).base - model(x)).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - expected).abs().max() <= 1e-12


def _assert_runs_whole(model: nn.Module, group: str, why: str, tmp_path=None) -> None:
    """``model`` (a conv ``a`` of 16 channels, ops anfast cannot follow, then a conv ``head``
    of 32 and a linear ``fc``) adjoins at alpha 2: ``a``'s group keeps full width for ``why``
    (a regex naming the op and its shapes), the unfollowed ops run whole in every network,
    and ``head`` shrinks to 16: the student is the model with ``head``'s leading 16 filters
    and ``fc``'s leading 16 columns, computed here by hand. Base and exported student agree."""
    torch.manual_seed(0)
    model = model.double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    kept = {g.name: g.fixed for g in an.width_groups}
    assert re.fullmatch(why, kept[group]), kept[group]
    assert an.layer_widths["a"].student_out == (16,) and an.layer_widths["head"].student_out == (16,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    head, fc = model.head, model.fc
    with torch.no_grad():
        model.head, model.fc = nn.Conv2d(16, 16, 1).double(), nn.Linear(16, 4).double()
        model.head.weight.copy_(head.weight[:16]), model.head.bias.copy_(head.bias[:16])
        model.fc.weight.copy_(fc.weight[:, :16]), model.fc.bias.copy_(fc.bias)
        expected = model(x)
        model.head, model.fc = head, fc
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        assert (out.student - expected).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - expected).abs().max() <= 1e-12


class _Headed(nn.Module):
    """A conv ``a`` of 16 channels, ``self.ops`` on it, a conv ``head`` of 32 and ``fc``."""

    def __init__(self):
        super().__init__()
        self.a, self.head, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 32, 1), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(F.relu(self.head(self.ops(self.a(x)))).mean((2, 3)))


def test_ops_on_channels_along_the_last_axis_that_anfast_cannot_follow_run_whole():
    """A Conv1d of two channels, a softmax along the channels, a second operand and a
    matmul that is no pooling on ECA's (N, 1, C) view: each network computes them whole,
    as the model does, from ``a``'s channels kept at full width; the reason names the node."""
    class Sequence(_Headed):
        def __init__(self, op):
            super().__init__()
            self.op, self.conv = op, nn.Conv1d(1, 2, 3, padding=1)
            self.register_buffer("mix", torch.rand(16, 16))

        def ops(self, y):
            s = y.mean((2, 3)).view(y.shape[0], 1, -1)
            s = {"two channels": lambda: self.conv(s)[:, :1], "softmax": lambda: s.softmax(-1),
                 "second operand": lambda: s * s, "matmul mixing": lambda: s @ self.mix}[self.op]()
            return y * torch.sigmoid(s).view(y.shape[0], -1, 1, 1)

    for op, node in (("two channels", r"conv, channels on axis 2 \(2, 1, 16\) -> \(2, 2, 16\) \(1 in, 2 out, "
                                      r"padding_mode='zeros'\)"),
                     ("softmax", r"softmax \(call_method softmax\), channels on axis 2 \(2, 1, 16\) -> \(2, 1, 16\)"),
                     ("second operand", r"mul \(call_function mul\), channels on axis 2 \(2, 1, 16\) -> \(2, 1, 16\)"),
                     ("matmul mixing", r"matmul \(call_function matmul\), channels on axis 2 \(2, 1, 16\) -> "
                                       r"\(2, 1, 16\)")):
        _assert_runs_whole(Sequence(op), "a", rf"channels read by {node}, which anfast cannot follow channels through")


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt block (Liu et al. 2022) with its layer scale spelt by name: depthwise
    conv, permute to (N, H, W, C), LayerNorm, Linear to 4C, GELU, Linear back, permute
    back, residual; then a LayerNorm on the pooled (N, C) features and a linear head."""

    SCALES = ("none", "(C,) on (N, H, W, C)", "(C,) viewed as (1, C, 1, 1)")

    def __init__(self, scale: str):
        super().__init__()
        self.scale = scale
        self.stem, self.dw = nn.Conv2d(3, 16, 2, stride=2), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(16, eps=1e-6), nn.Linear(16, 64), nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.rand(16))
        self.head_norm, self.head = nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        if self.scale == "(C,) on (N, H, W, C)":
            y = y * self.gamma
        y = y.permute(0, 3, 1, 2)
        if self.scale == "(C,) viewed as (1, C, 1, 1)":
            y = y.mul(self.gamma.view(-1).reshape(1, -1, 1, 1) * 2)  # a view of a view, times 2
        return self.head(self.head_norm((x + y).mean((2, 3))))


@pytest.mark.parametrize("scale", ChannelsLastBlock.SCALES)
def test_a_convnext_block_adjoins_its_linears_and_layer_norms_on_channels_last(scale, tmp_path):
    """Each network normalises its own channels (the leading slice of the LayerNorm's
    affine parameters), runs the leading block of each Linear on (N, H, W, C) and scales
    by the leading slice of the layer scale, however the model spells it."""
    torch.manual_seed(0)
    model = ChannelsLastBlock(scale).double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    width = 8
    assert an.layer_widths["fc1"].student_out == (32,) and an.layer_widths["stem"].student_out == (width,)
    assert an.layer_widths["norm"].kind == an.layer_widths["head_norm"].kind == "layernorm"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # By hand: leading slices of every weight, the norms over the student's own channels.
        h = F.conv2d(x, model.stem.weight[:width], model.stem.bias[:width], stride=2)
        y = F.conv2d(h, model.dw.weight[:width], model.dw.bias[:width], padding=1, groups=width)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (width,), model.norm.weight[:width], model.norm.bias[:width], 1e-6)
        y = F.gelu(F.linear(y, model.fc1.weight[:32, :width], model.fc1.bias[:32]))
        y = F.linear(y, model.fc2.weight[:width, :32], model.fc2.bias[:width])
        factor = 2 if scale == "(C,) viewed as (1, C, 1, 1)" else 1
        y = (y * model.gamma[:width] * factor if scale != "none" else y).permute(0, 3, 1, 2)
        pooled = F.layer_norm((h + y).mean((2, 3)), (width,), model.head_norm.weight[:width],
                              model.head_norm.bias[:width])
        expected = F.linear(pooled, model.head.weight[:, :width], model.head.bias)
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (an(x).base - model(x)).abs().max() <= 1e-12
        anfast.export_student(an, path=tmp_path / "student")
        loaded = anfast.load_student(tmp_path / "student", model=ChannelsLastBlock(scale)).double().eval()
        assert loaded.norm.normalized_shape == (width,) and loaded.fc1.out_features == 32
        assert loaded.gamma.shape == ((width,) if scale != "none" else (16,))  # unread without a scale
        assert (loaded(x) - expected).abs().max() <= 1e-12


def test_ops_on_channels_last_that_anfast_cannot_follow_run_whole():
    """A mean over the channels-last map's width and a LayerNorm over (H, W, C): each network
    computes them whole from ``a``'s channels kept at full width, naming the node."""
    class Last(_Headed):
        def __init__(self, op):
            super().__init__()
            self.op, self.norm = op, nn.LayerNorm((8, 8, 16))

        def ops(self, y):
            y = y.permute(0, 2, 3, 1)
            y = {"mean": lambda: y - y.mean(2, keepdim=True), "wide norm": lambda: self.norm(y)}[self.op]()
            return y.permute(0, 3, 1, 2)

    for op, node in (("mean", r"mean \(call_method mean\), channels-last \(2, 8, 8, 16\) -> \(2, 8, 1, 16\)"),
                     ("wide norm", r"norm, channels-last \(2, 8, 8, 16\) -> \(2, 8, 8, 16\)")):
        _assert_runs_whole(Last(op), "a", rf"channels read by {node}, which anfast cannot follow channels through")



class SplitAttention(nn.Module):
    """ResNeSt's split attention (Zhang et al. 2022), radix 2: a conv makes 2 x 16 channels,
    viewed as (N, 2, 16, H, W); their sum is pooled, an MLP gives each split a softmax
    weight, and the weighted splits are summed. Then a batch norm, a conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 32, 1)
        self.bn, self.out, self.fc = nn.BatchNorm2d(16), nn.Conv2d(16, 32, 1), nn.Linear(32, 4)

    def forward(self, x):
        y = F.relu(self.conv(F.relu(self.stem(x))))
        n, _, h, w = y.shape
        splits = y.view(n, 2, 16, h, w)
        gap = splits.sum(1).mean((2, 3), keepdim=True)
        attention = self.fc2(F.relu(self.fc1(gap))).view(n, 2, 16, 1, 1).softmax(1)
        return self.fc(F.relu(self.out(self.bn((splits * attention).sum(1)))).mean((2, 3)))


def test_split_attention_runs_whole_between_convs_that_shrink(tmp_path):
    """The views to (N, 2, 16, ...) are no channel slice: conv's and fc2's outputs keep full
    width and the attention runs whole in every network, as the model does, up to the batch
    norm (each network's statistics its own); stem, fc1 and out, around it, shrink.
    Checked against the student computed by hand."""
    torch.manual_seed(0)
    model = SplitAttention().double()
    model(torch.randn(8, 3, 8, 8, dtype=torch.float64))  # running statistics of their own
    model.eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    widths = {name: an.layer_widths[name].student_out[0] for name in ("stem", "conv", "fc1", "fc2", "out")}
    assert widths == {"stem": 8, "conv": 32, "fc1": 8, "fc2": 32, "out": 16} and an.layer_widths["bn"].kind == "norm"
    kept = {g.name: g.fixed for g in an.width_groups}
    assert kept["conv"] == ("channels read by view (call_method view), (2, 32, 8, 8) -> (2, 2, 16, 8, 8), "
                            "which anfast cannot follow channels through")
    assert kept["fc2"].startswith("channels read by view_1 (call_method view), (2, 32, 1, 1) -> (2, 2, 16, 1, 1)")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = F.relu(F.conv2d(F.relu(F.conv2d(x, model.stem.weight[:8], model.stem.bias[:8], padding=1)),
                            model.conv.weight[:, :8], model.conv.bias, padding=1))
        splits = y.view(2, 2, 16, 8, 8)
        hidden = F.relu(F.conv2d(splits.sum(1).mean((2, 3), keepdim=True), model.fc1.weight[:8], model.fc1.bias[:8]))
        attention = F.conv2d(hidden, model.fc2.weight[:, :8], model.fc2.bias).view(2, 2, 16, 1, 1).softmax(1)
        y = model.bn((splits * attention).sum(1))  # full width
        y = F.relu(F.conv2d(y, model.out.weight[:16], model.out.bias[:16])).mean((2, 3))
        expected = F.linear(y, model.fc.weight[:, :16], model.fc.bias)
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        assert (out.student - expected).abs().max() <= 1e-12
        anfast.export_student(an, path=tmp_path / "student")
        loaded = anfast.load_student(tmp_path / "student", model=SplitAttention()).double().eval()
        assert (loaded(x) - expected).abs().max() <= 1e-12


class _TwoHeads(_Headed):
    """``_Headed`` whose ops start with a region run whole: a conv b to two heads of 16,
    viewed apart, a softmax across them and their sum (N, 16, H * W) (a lambda layer's)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(16, 32, 1)

    def heads(self, y):
        n, _, h, w = y.shape
        return self.b(y).view(n, 2, 16, h * w).softmax(1).sum(1)


def test_a_region_that_reads_a_channel_count_keeps_that_tensor_whole():
    """out.reshape(n, c, h, w) with c read from a's output (LambdaNet's lambda layer): a's
    channels keep full width, or the student's c would not fit b's whole channels."""
    class ReadsCount(_TwoHeads):
        def ops(self, y):
            n, c, h, w = y.shape
            return self.heads(y).reshape(n, c, h, w)

    _assert_runs_whole(ReadsCount(), "a", r"channels whose count reshape \(call_method reshape\) reads, in a "
                                          r"region run whole: channels read by view \(call_method view\), .*")


def test_a_region_that_reads_only_spatial_sizes_leaves_the_channels_free(tmp_path):
    """F.interpolate(t, size=y.shape[2:]) in a region reads y's height and width, not its
    channel count: a's channels, which feed the region only through b, still shrink."""
    class ReadsSpace(_TwoHeads):
        def ops(self, y):
            n, _, h, w = y.shape
            t = self.heads(y).view(n, 16, h, w)
            return F.interpolate(t[:, :, ::2, ::2], size=y.shape[2:])

    torch.manual_seed(0)
    model = ReadsSpace().double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    assert an.layer_widths["a"].student_out == (8,) and an.layer_widths["b"].student_out == (32,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        t = F.conv2d(F.conv2d(x, model.a.weight[:8], model.a.bias[:8]), model.b.weight[:, :8], model.b.bias)
        t = F.interpolate(t.view(2, 2, 16, 64).softmax(1).sum(1).view(2, 16, 8, 8)[:, :, ::2, ::2], size=(8, 8))
        t = F.relu(F.conv2d(t, model.head.weight[:16], model.head.bias[:16])).mean((2, 3))
        expected = F.linear(t, model.fc.weight[:, :16], model.fc.bias)
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        assert (out.student - expected).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - expected).abs().max() <= 1e-12


def _group_norm_by_hand(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GroupNorm from its definition: each sample's channels in ``groups`` runs of C / groups,
    normalised over the run and the map (biased variance, eps 1e-5), then scaled and shifted."""
    n, c, h, w = x.shape
    runs = x.reshape(n, groups, c // groups * h * w)
    mean, var = runs.mean(-1, keepdim=True), runs.var(-1, unbiased=False, keepdim=True)
    normalised = ((runs - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, h, w)
    return normalised * weight[:, None, None] + bias[:, None, None]


@pytest.mark.parametrize("groups", [1, 8])
def test_a_group_norm_normalises_each_networks_own_channels_in_whole_groups(groups, tmp_path):
    """GroupNorm(groups, 24) between two convs: each student width is a whole number of
    groups (24 / 4 = 6, rounded to 2: 6 in one group, 8 in 8 groups), the student
    normalises its own channels in as many groups with the leading slice of the affine
    parameters, as GroupNorm(groups, width) of the exported student does (by hand here);
    the base is the model; the export round-trips. Over a concat, the student's channels
    must be the concat's leading ones: the part before the last keeps full width, and the
    last shrinks in whole groups."""
    class Grouped(nn.Module):
        def __init__(self, concat: bool = False):
            super().__init__()
            self.concat = concat
            self.a, self.norm = nn.Conv2d(3, 8 if concat else 24, 3), nn.GroupNorm(groups, 24)
            self.b, self.fc = nn.Conv2d(24, 16, 1), nn.Linear(16, 3)
            self.c = nn.Conv2d(3, 16, 3)

        def forward(self, x):
            y = torch.cat([self.a(x), self.c(x)], 1) if self.concat else self.a(x)
            return self.fc(F.relu(self.b(F.relu(self.norm(y)))).mean((2, 3)))

    torch.manual_seed(0)
    model = Grouped().double().eval()
    with torch.no_grad():
        model.norm.weight.normal_(), model.norm.bias.normal_()
    an = anfast.adjoin(model, alpha=4, policy="all", round_to=2, input_size=(3, 8, 8)).eval()
    width = 6 if groups == 1 else 8
    assert an.layer_widths["norm"].kind == "groupnorm" and an.layer_widths["norm"].student_out == (width,)
    assert an.layer_widths["b"].student_out == (4,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = F.conv2d(x, model.a.weight[:width], model.a.bias[:width])
        y = F.relu(_group_norm_by_hand(y, groups, model.norm.weight[:width], model.norm.bias[:width]))
        y = F.relu(F.conv2d(y, model.b.weight[:4, :width], model.b.bias[:4]))
        expected = F.linear(y.mean((2, 3)), model.fc.weight[:, :4], model.fc.bias)
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        assert (out.student - expected).abs().max() <= 1e-12
        anfast.export_student(an, path=tmp_path)
        loaded = anfast.load_student(tmp_path, model=Grouped()).double()
        assert loaded.norm.num_groups == groups and loaded.norm.num_channels == width
        assert (loaded(x) - expected).abs().max() <= 1e-12

    model = Grouped(concat=True).double().eval()
    an = anfast.adjoin(model, alpha=4, policy="all", round_to=2, input_size=(3, 8, 8)).eval()
    fixed = {g.name: g.fixed for g in an.width_groups}
    assert "only its last part shrinks" in fixed["a"] and not fixed["c"]
    width = 4 if groups == 1 else 8  # 16 / 4 = 4 channels, in whole groups
    assert an.layer_widths["norm"].student_out == (8 + width,)
    with torch.no_grad():
        y = torch.cat([F.conv2d(x, model.a.weight, model.a.bias),
                       F.conv2d(x, model.c.weight[:width], model.c.bias[:width])], 1)
        y = F.relu(_group_norm_by_hand(y, groups, model.norm.weight[:8 + width], model.norm.bias[:8 + width]))
        y = F.relu(F.conv2d(y, model.b.weight[:4, :8 + width], model.b.bias[:4]))
        expected = F.linear(y.mean((2, 3)), model.fc.weight[:, :4], model.fc.bias)
        assert (an(x).student - expected).abs().max() <= 1e-12
        anfast.export_student(an, path=tmp_path / "concat")
        loaded = anfast.load_student(tmp_path / "concat", model=Grouped(concat=True)).double()
        assert (loaded(x) - expected).abs().max() <= 1e-12

    class Uneven(nn.Module):  # GroupNorm(groups, 24) over 12 + 12 channels
        def __init__(self):
            super().__init__()
            self.a, self.c, self.norm = nn.Conv2d(3, 12, 3), nn.Conv2d(3, 12, 3), nn.GroupNorm(groups, 24)
            self.b, self.head = nn.Conv2d(24, 16, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(self.b(self.norm(torch.cat([self.a(x), self.c(x)], 1))))

    # In 8 groups, the 12 channels before the last part are no whole number of groups: it keeps full width too.
    fixed = {g.name: g.fixed for g in anfast.adjoin(Uneven(), alpha=4, policy="all", input_size=(3, 8, 8)).width_groups}
    assert ("no whole number of groups" in fixed["c"]) == (groups == 8), fixed["c"]


def test_a_module_with_parameters_anfast_does_not_slice_keeps_its_channels_whole():
    """An affine InstanceNorm2d or a PReLU per channel, or an InstanceNorm2d with running
    statistics: every network runs it as the model does, on a's channels at full width."""
    class Norm(_Headed):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def ops(self, y):
            return self.norm(y)

    for norm in (nn.InstanceNorm2d(16, affine=True), nn.PReLU(16)):
        _assert_runs_whole(Norm(norm), "a", rf"channels of norm, a {type(norm).__name__} with parameters anfast "
                                            r"does not slice")
    _assert_runs_whole(Norm(nn.InstanceNorm2d(16, track_running_stats=True)), "a",
                       r"channels of norm, a InstanceNorm2d with running statistics anfast does not slice")


class OwnStatistics(nn.Module):
    """stem -> a -> an InstanceNorm2d with running statistics (whole in every network) -> head -> fc."""

    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1)
        self.norm = nn.InstanceNorm2d(16, affine=True, track_running_stats=True)
        self.head, self.fc = nn.Conv2d(16, 32, 1), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(F.relu(self.head(self.norm(self.a(F.relu(self.stem(x)))))).mean((2, 3)))


def test_a_module_with_running_statistics_keeps_each_networks_own(tmp_path):
    """A module every network runs whole that holds running statistics (here an
    InstanceNorm2d; in timm, a batch norm inside MobileViT's blocks): each student runs a
    copy with its own buffers and the base's parameters. After two training batches the
    base's statistics are the model's and the student's those of a copy of the norm fed
    the student's activations, computed by hand; the export carries them, and
    load_base_state_dict starts the student's from the base's, as adjoining does."""
    torch.manual_seed(0)
    model = OwnStatistics().double()
    norm = copy.deepcopy(model.norm)  # the statistics as adjoin finds them
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).train()
    assert an.statistics_modules == ("norm",) and an.layer_widths["stem"].student_out == (8,)
    own = an.get_submodule("student_statistics.0.norm")
    assert own.weight is an.norm.weight and own.running_mean is not an.norm.running_mean
    batches = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        for x in batches:
            an(x), model(x)
            norm(F.conv2d(F.relu(F.conv2d(x, model.stem.weight[:8], model.stem.bias[:8])), model.a.weight[:, :8],
                          model.a.bias))
    for key in ("running_mean", "running_var"):
        assert torch.allclose(getattr(an.norm, key), getattr(model.norm, key), rtol=0, atol=1e-12)
        assert torch.allclose(getattr(own, key), getattr(norm, key), rtol=0, atol=1e-12)
        assert not torch.allclose(getattr(own, key), getattr(model.norm, key))
    an.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        student = anfast.export_student(an, path=tmp_path).eval()
        assert torch.equal(student.norm.running_mean, own.running_mean)
        assert (student(x) - an(x).student).abs().max() <= 1e-12
        loaded = anfast.load_student(tmp_path, model=OwnStatistics()).double()
        assert (loaded(x) - an(x).student).abs().max() <= 1e-12
    for restored in (pickle.loads(pickle.dumps(an)), copy.deepcopy(an)):
        assert restored.statistics_modules == ("norm",)
        assert torch.equal(restored.get_submodule("student_statistics.0.norm").running_var, own.running_var)
    an.load_base_state_dict(model.state_dict())
    assert torch.equal(own.running_mean, model.norm.running_mean)


def test_a_linear_on_tokens_runs_whole():
    """(N, C, H * W) transposed to tokens (N, H * W, C) and a Linear on them (a ViT block):
    the Linear runs whole in every network, a's channels keep full width."""
    class Tokens(_Headed):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(16, 16)

        def ops(self, y):
            return self.mix(y.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(y.shape)

    _assert_runs_whole(Tokens(), "a", r"channels read by transpose \(call_method transpose\), \(2, 16, 64\) -> "
                                      r"\(2, 64, 16\), which anfast cannot follow channels through")

class MixedGate(nn.Module):
    """Two convs concatenated (MixNet's mixed conv) times a gate that one conv computes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2)
        self.gate, self.c, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nn.Linear(16, 4)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) * torch.sigmoid(self.gate(x))
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


def test_a_concat_met_by_a_single_map_keeps_full_width():
    """The student's leading gate channels are no slice of a's and b's leading channels
    side by side: a, b and the gate keep full width; c, after them, shrinks."""
    torch.manual_seed(0)
    model = MixedGate().double().eval()
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8)).eval()
    narrow = hand_student_width(16, 4, 8)
    assert [an.layer_widths[n].student_out for n in ("a", "b", "gate", "c")] == [(8,), (8,), (16,), (narrow,)]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = torch.cat([model.a(x), model.b(x)], 1) * torch.sigmoid(model.gate(x))
        y = F.relu(F.conv2d(y, model.c.weight[:narrow], model.c.bias[:narrow])).mean((2, 3))
        expected = F.linear(y, model.fc.weight[:, :narrow], model.fc.bias)
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - expected).abs().max() <= 1e-12
    with pytest.raises(AdjoinError, match=r"policy asks to shrink gate, but its channels are the channels "
                                          r"mul \(call_function mul\) joins in different layouts"):
        anfast.adjoin(model, policy={"gate": 2}, input_size=(3, 8, 8))


class HeadDropout(nn.Module):
    """A conv and a linear head with a dropout between them, called as a function."""

    DROPOUTS = {  # name -> (the dropout, whether eval() switches it off)
        "F.dropout(training=self.training)": (lambda y, m: F.dropout(y, 0.5, training=m.training), True),
        "torch.dropout(y, p, self.training)": (lambda y, m: torch.dropout(y, 0.5, m.training), True),
        "F.alpha_dropout, by position": (lambda y, m: F.alpha_dropout(y, 0.5, m.training), True),
        "F.dropout, on in both modes": (lambda y, m: F.dropout(y, p=0.5), False),
    }

    def __init__(self, dropout: str):
        super().__init__()
        self.dropout, self.conv, self.fc = dropout, nn.Conv2d(3, 16, 3), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.DROPOUTS[self.dropout][0](F.relu(self.conv(x)).mean((2, 3)), self))


@pytest.mark.parametrize("dropout", list(HeadDropout.DROPOUTS))
@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_a_functional_dropout_follows_the_networks_mode_as_in_the_model(dropout, traced_in):
    """fx freezes ``self.training`` at trace time: a dropout called with it would stay on
    after eval() (timm's GhostNet head). The adjoined network switches it as the model
    does, whatever mode the model was in when adjoined, also once pickled (which traces
    the network's code again); a dropout on in both modes stays on."""
    torch.manual_seed(0)
    model = HeadDropout(dropout).double().train(traced_in == "train")
    adjoined = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    switched = HeadDropout.DROPOUTS[dropout][1]
    for an in (adjoined, pickle.loads(pickle.dumps(adjoined))):
        an.eval()
        with torch.no_grad():
            if switched:
                # By hand, without dropout: the student's leading 8 conv filters, fc on them.
                y = F.relu(F.conv2d(x, model.conv.weight[:8], model.conv.bias[:8])).mean((2, 3))
                expected = F.linear(y, model.fc.weight[:, :8], model.fc.bias)
                assert (an(x).student - expected).abs().max() <= 1e-12
                assert (an(x).base - model.eval()(x)).abs().max() <= 1e-12
            else:
                assert not torch.equal(an(x).base, an(x).base)  # a fresh mask each call, in eval too
            an.train()
            # Dropout on: a mask drops some of the 16 features (all kept: chance 2**-64).
            assert not torch.equal(an(x).base, model.eval()(x))


class AuxiliaryHead(nn.Module):
    """A second, train-only output (GoogLeNet's auxiliary classifiers)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.aux = nn.Conv2d(3, 16, 3), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        y = F.relu(self.conv(x)).mean((2, 3))
        return (self.fc(y), self.aux(y)) if self.training else self.fc(y)


def test_a_forward_that_branches_on_the_mode_is_refused():
    """One graph cannot hold both branches: refused, naming where the modes part."""
    with pytest.raises(AdjoinError, match=r"^AuxiliaryHead computes aux in train mode where it computes output "
                                          r"\(output output\) in eval mode: its forward branches on "
                                          r"self.training"):
        anfast.adjoin(AuxiliaryHead(), policy="all", input_size=(3, 8, 8))
    with pytest.raises(AdjoinError, match=r"^GoogLeNet computes .* in train mode .* aux_logits=False\)$"):
        anfast.adjoin(torchvision.models.googlenet(init_weights=False, num_classes=10), input_size=(3, 64, 64))


class ModeScale(nn.Module):
    """Scales by its parameter in train mode and by a copy it caches on eval() (LeViT's and
    EfficientFormer's attention biases): the same numbers, two graphs."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale, self.cached = nn.Parameter(torch.rand(channels) + 0.5), None

    def train(self, mode: bool = True) -> "ModeScale":
        super().train(mode)
        self.cached = None if mode else self.scale.detach().clone()
        return self

    def forward(self, x):
        return x * (self.scale if self.training else self.cached).view(1, -1, 1, 1)


def test_a_submodule_that_branches_on_the_mode_runs_whole_as_a_module():
    """Its branch is traced as one call of the module, which reads its own ``training`` at
    run time: every network runs it whole, on a's channels at full width (base and
    student equal the model and a by-hand student), and the base equals the model in both
    modes, eval() caching the trained scale."""
    class Scaled(_Headed):
        def __init__(self):
            super().__init__()
            self.scale = ModeScale(16)

        def ops(self, y):
            return self.scale(y)

    _assert_runs_whole(Scaled(), "a", r"channels of scale, a ModeScale with parameters anfast does not slice")
    torch.manual_seed(0)
    model = Scaled().double()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).train()
    with torch.no_grad():
        an.scale.scale.mul_(3)  # trained: the eval copy must be taken from it
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model.load_state_dict(anfast.export_base(an).state_dict())
        for mode in (True, False):
            out, expected = an.train(mode)(x), model.train(mode)(x)
            assert (out.base - expected).abs().max() <= 1e-12
    assert torch.equal(an.scale.cached, an.scale.scale.detach())  # eval() reached the module: the trained scale


class ChannelGate(nn.Module):
    """conv a -> a gate computed from a reduction over a's channels (CBAM's spatial gate:
    their mean and max, a 7x7 conv, a sigmoid) -> conv b -> head, the gate given by name."""

    GATES = {
        "mean and amax, keepdim (timm)": lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            [y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1))),
        "max element and mean, unsqueezed (CBAM)": lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            (torch.max(y, 1)[0].unsqueeze(1), torch.mean(y, 1).unsqueeze(1)), dim=1))),
        "stacked amin and sum / width, expand_as": lambda y, m: torch.sigmoid(m.gate(torch.stack(
            [y.amin(1), y.sum(1) / y.shape[1]], 1))).expand_as(y) * y,
        "max .values and mean(axis=1)": lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            [y.max(1, keepdim=True).values, y.mean(axis=1, keepdim=True)], 1))),
        "softmax over the channels": lambda y, m: y * torch.softmax(y, 1),
        "nn.Softmax2d": lambda y, m: y * m.softmax(y),
    }

    def __init__(self, gate: str):
        super().__init__()
        self.gate_name = gate
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.gate, self.head = nn.Conv2d(2, 1, 7, padding=3), nn.Conv2d(16, 16, 1)  # 16 classes: would shrink
        self.softmax = nn.Softmax2d()

    def forward(self, x):
        y = self.GATES[self.gate_name](F.relu(self.a(x)), self)
        return self.head(F.relu(self.b(y))).mean(axis=(2, 3))  # numpy's keyword: not over the channels


@pytest.mark.parametrize("gate", list(ChannelGate.GATES))
def test_a_reduction_over_the_channels_runs_per_network_and_exports(gate, tmp_path):
    """Each network reduces its own channels: the student's mean and max are over its
    leading channels only (they read the base's once, or were refused). The 1-channel maps
    they make keep their one channel; the gate's conv keeps its 2 inputs and 1 output."""
    torch.manual_seed(0)
    model = ChannelGate(gate).double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    narrow = hand_student_width(16, 2, 8)
    assert an.layer_widths["a"].student_out == an.layer_widths["b"].student_out == (narrow,)
    if "softmax" not in gate.lower():
        assert (an.layer_widths["gate"].student_in, an.layer_widths["gate"].student_out) == ((2,), (1,))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # By hand: a's leading filters, the gate on those channels alone, b and head on them.
        y = F.relu(F.conv2d(x, model.a.weight[:narrow], model.a.bias[:narrow], padding=1))
        y = ChannelGate.GATES[gate](y, model)
        y = F.relu(F.conv2d(y, model.b.weight[:narrow, :narrow], model.b.bias[:narrow], padding=1))
        expected = F.conv2d(y, model.head.weight[:, :narrow], model.head.bias).mean((2, 3))
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        assert (out.student - expected).abs().max() <= 1e-12
        student = anfast.export_student(an, path=tmp_path / "student").eval()
        assert (student(x) - expected).abs().max() <= 1e-12
    reduced = {g.name: g.reduced_by for g in an.width_groups}
    # For a DAN search: an op on one tensor of a's channels (of torch.max(y, 1), whose values
    # alone are read, too) becomes the first student's StudentReduction, which the search
    # computes per width choice; a module (nn.Softmax2d) leaves a's group reduced over, unsearched.
    mixed = set(an.channel_reductions.values())
    assert (reduced["a"] or "a" in mixed) and not reduced["b"] and "b" not in mixed, (reduced, mixed)
    assert bool(reduced["a"]) == ("Softmax2d" in gate), reduced
    assert all(isinstance(an.get_submodule(name), StudentReduction) for name in an.channel_reductions)


def test_a_channel_less_map_flattened_into_a_linear_keeps_its_features(tmp_path):
    """y.mean(1) of an (N, 16, 8, 8) map, flattened: 64 features in every network."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(64, 4)

        def forward(self, x):
            return self.fc(F.relu(self.a(x)).mean(1).flatten(1))

    torch.manual_seed(0)
    model = Head().double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    narrow = hand_student_width(16, 2, 8)
    assert an.layer_widths["fc"].student_in == (64,) and an.layer_widths["a"].student_out == (narrow,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = F.relu(F.conv2d(x, model.a.weight[:narrow], model.a.bias[:narrow], padding=1))
        expected = F.linear(y.mean(1).flatten(1), model.fc.weight, model.fc.bias)
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (anfast.export_student(an, path=tmp_path / "student").eval()(x) - expected).abs().max() <= 1e-12


def test_a_channel_reduction_anfast_cannot_read_runs_whole_naming_the_op():
    """A dim computed in forward may be the channel axis: the mean runs whole, as before
    reductions, and ``a``'s channels keep full width."""
    class Gate(_Headed):
        def ops(self, y):
            return y * torch.sigmoid(y.mean(y.dim() - 3, keepdim=True))

    _assert_runs_whole(Gate(), "a", r"channels read by mean \(call_method mean\), \(2, 16, 8, 8\) -> "
                                    r"\(2, 1, 8, 8\), which anfast cannot follow channels through")


class Grouped(nn.Module):
    """A grouped conv of 8 in and 16 out channels per group, and a depthwise conv after a
    concat: no student slice keeps whole groups, so both keep full width."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.g = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.left, self.right = nn.Conv2d(64, 16, 1), nn.Conv2d(64, 16, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        y = self.g(F.relu(self.c1(F.relu(self.stem(x)))))
        y = self.dw(torch.cat([self.left(y), self.right(y)], 1))
        return self.head(F.relu(y)).mean((2, 3))


def test_grouped_convs_without_a_whole_group_slice_keep_full_width():
    """They were refused under every policy, the {'g': 1} their message advised included."""
    torch.manual_seed(0)
    model = Grouped().double().eval()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    widths = {name: (w.student_in[0], w.student_out[0]) for name, w in an.layer_widths.items()}
    assert widths == {"stem": (3, 8), "c1": (8, 32), "g": (32, 64), "left": (64, 16), "right": (64, 16),
                      "dw": (32, 32), "head": (32, 10)}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = model
    with torch.no_grad():  # by hand: stem's leading 8 filters, everything after at full width
        y = F.relu(F.conv2d(x, m.stem.weight[:8], m.stem.bias[:8], padding=1))
        y = m.g(F.relu(F.conv2d(y, m.c1.weight[:, :8], m.c1.bias, padding=1)))
        y = m.head(F.relu(m.dw(torch.cat([m.left(y), m.right(y)], 1)))).mean((2, 3))
        assert (an(x).student - y).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - y).abs().max() <= 1e-12
    assert anfast.adjoin(model, alpha=2, policy={"stem": 2, "g": 1}, input_size=(3, 8, 8))
    with pytest.raises(AdjoinError, match=r"policy asks to shrink c1, but its channels are the channels of the "
                                          r"grouped conv g \(groups=4, 32 in and 64 out channels\), which keeps"):
        anfast.adjoin(model, alpha=2, policy={"c1": 2}, input_size=(3, 8, 8))


def test_a_per_layer_alpha_tuple_must_not_widen_a_later_student():
    with pytest.raises(AdjoinError, match=r"policy for c1: alphas \(8.0, 4.0, 2.0\) must not decrease from one "
                                          r"student to the next, as alpha=\(2.0, 4.0, 8.0\) orders the students"):
        anfast.adjoin(Grouped(), alpha=(2, 4, 8), policy={"c1": (8, 4, 2)}, input_size=(3, 8, 8))


class Reused(nn.Module):
    """One conv applied twice (shared weights), and optionally first on the image."""

    def __init__(self, on_the_image: bool = False):
        super().__init__()
        self.on_the_image = on_the_image
        self.stem, self.c, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.c(x) if self.on_the_image else F.relu(self.stem(x))  # a 16-channel image
        return self.head(F.relu(self.c(F.relu(self.c(y))))).mean((2, 3))


def test_a_layer_called_twice_gives_both_calls_one_width():
    """Each call of c reads c's width: its calls share one width group with stem. The last
    call's widths once stood for both (stem at 4 fed a c that expected 8 channels)."""
    torch.manual_seed(0)
    model = Reused().double().eval()
    an = anfast.adjoin(model, alpha=4, policy={"stem": 4, "c": 2}, round_to=4, input_size=(3, 8, 8)).eval()
    assert an.layer_widths["stem"].student_out == an.layer_widths["c"].student_in == (8,)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = model
    with torch.no_grad():
        y = F.relu(F.conv2d(x, m.stem.weight[:8], m.stem.bias[:8]))
        for _ in range(2):
            y = F.relu(F.conv2d(y, m.c.weight[:8, :8], m.c.bias[:8], padding=1))
        expected = F.conv2d(y, m.head.weight[:, :8], m.head.bias).mean((2, 3))
        assert (an(x).student - expected).abs().max() <= 1e-12
        assert (anfast.export_student(an).eval()(x) - expected).abs().max() <= 1e-12
    with pytest.raises(AdjoinError, match=r"^c: called on the image \(or a tensor equal in every network\) and "
                                          r"again on a tensor each network computes"):
        anfast.adjoin(Reused(on_the_image=True), alpha=2, policy="all", input_size=(16, 8, 8))


class Scaled(nn.Module):
    """A non-persistent normalisation buffer, string paddings and a (C, 1, 1) layer scale."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, -0.25, 2.0]).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Conv2d(3, 16, 3, padding="same")
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 16).view(16, 1, 1))
        self.head = nn.Conv2d(16, 32, 3, padding="valid")
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.stem(x - self.mean))
        x = x + self.gamma * self.body(x)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


def test_buffers_string_paddings_and_layer_scales_export_exactly(tmp_path):
    torch.manual_seed(0)
    model = Scaled().double().eval()
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8)).eval()
    # The layer scale's leading slice serves the student: its group (stem, body) shrinks.
    assert an.layer_widths["body"].student_out == an.layer_widths["head"].student_out == (8,)
    assert an.channel_vectors == {"gamma": (0, "stem")}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12
        base = anfast.export_base(an).eval()
        # to_empty left the non-persistent buffer uninitialised: the base read garbage.
        assert torch.equal(base.mean, model.mean)
        assert (base(x) - model(x)).abs().max() <= 1e-12
        student = anfast.export_student(an, path=tmp_path / "student").eval()
        # By hand: the leading 8 filters of every conv and the leading 8 scales of gamma.
        h = F.relu(F.conv2d(x - model.mean, model.stem.weight[:8], model.stem.bias[:8], padding=1))
        h = h + model.gamma[:8] * F.conv2d(h, model.body.weight[:8, :8], model.body.bias[:8], padding=1)
        h = F.relu(F.conv2d(h, model.head.weight[:8, :8], model.head.bias[:8])).mean((2, 3))
        expected = F.linear(h, model.fc.weight[:, :8], model.fc.bias)
        assert (out.student - expected).abs().max() <= 1e-12
        assert student.gamma.shape == (8, 1, 1) and (student(x) - expected).abs().max() <= 1e-12
        assert json.loads((tmp_path / "student" / "config.json").read_text())["tensors"] == {"gamma": [8, 1, 1]}
        loaded = anfast.load_student(tmp_path / "student", model=Scaled()).double().eval()
        assert (loaded(x) - expected).abs().max() <= 1e-12


def test_a_layer_scale_read_otherwise_keeps_full_width():
    """Slicing a per-channel vector that is also summed (or is a F.linear bias), or viewed at a
    size the model's code fixes, would change that use: its channels keep full width, and
    a policy that shrinks them is refused."""
    class SummedScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 3)
            self.gamma = nn.Parameter(torch.rand(16))

        def forward(self, x):
            y = self.a(x) * self.gamma.view(1, -1, 1, 1) / self.gamma.sum()
            return self.fc(y.mean((2, 3)))

    with pytest.warns(UserWarning, match="no layer of SummedScale shrinks"):
        an = anfast.adjoin(SummedScale(), alpha=2, policy="all", input_size=(3, 8, 8))
    assert an.layer_widths["a"].student_out == (16,) and an.channel_vectors == {}
    with pytest.raises(AdjoinError, match=r"policy asks to shrink a, but its channels are the channels of gamma "
                                          r"\(16,\), which sum\S* \(call_method sum\) reads"):
        anfast.adjoin(SummedScale(), policy={"a": 2}, input_size=(3, 8, 8))

    class ViewedScale(nn.Module):  # PoolFormer's Scale: x * self.scale.view(self.shape), shape (C, 1, 1)
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 3)
            self.gamma = nn.Parameter(torch.rand(16))

        def forward(self, x):
            return self.fc((self.a(x) * self.gamma.view(16, 1, 1)).mean((2, 3)))

    with pytest.raises(AdjoinError, match=r"policy asks to shrink a, but its channels are the channels view\S* "
                                          r"\(call_method view\) sizes as 16 in the model's code"):
        anfast.adjoin(ViewedScale(), policy={"a": 2}, input_size=(3, 8, 8))

    class BufferScale(nn.Module):  # fx computes a buffer's view while tracing: a constant of its own
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 3)
            self.register_buffer("scale", torch.rand(16))

        def forward(self, x):
            return self.fc((self.a(x) * self.scale.view(1, -1, 1, 1)).mean((2, 3)))

    model = BufferScale().double().eval()
    with pytest.warns(UserWarning, match="no layer of BufferScale shrinks"):
        an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(anfast.export_student(an).eval()(x), model(x))


def test_timm_blur_pool_filters_survive_export():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    an = anfast.adjoin("timm:resnetblur18", alpha=4, policy="paper", num_classes=10,
                       input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = an(x)
        assert (anfast.export_base(an)(x) - out.base).abs().max() <= 1e-5
        assert (anfast.export_student(an).eval()(x) - out.student).abs().max() <= 1e-5


def test_loaded_base_weights_start_the_student_norms_like_adjoining_the_trained_model():
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=10)
    for module in trained.modules():  # as if trained: statistics and affine away from their init
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    direct = anfast.adjoin(trained, input_size=SIZE).eval()
    loaded = anfast.adjoin(torchvision.models.resnet18(num_classes=10), input_size=SIZE)
    loaded.load_base_state_dict(trained.state_dict())
    loaded.eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        a, b = direct(x), loaded(x)
    assert torch.equal(a.base, b.base) and torch.equal(a.student, b.student)


def test_shared_affine_norms_with_cumulative_momentum_track_like_private_ones():
    # momentum=None is nn.BatchNorm2d's cumulative average; share_affine passed None to F.batch_norm.
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32, momentum=None),
                          nn.ReLU(), nn.Conv2d(32, 10, 1))
    shared = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8), share_affine=True)
    private = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8))
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, dtype=torch.float32) for _ in range(3)]
    for x in batches:
        shared(x), private(x)
    a, b = shared.get_submodule("2").student_norms[0], private.get_submodule("2").student_norms[0]
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-6)
    # A cumulative average of the three batches' variances, by hand (the student's convs
    # are the leading 8 filters of each).
    conv0, conv1 = model[0], model[1]
    with torch.no_grad():
        h = [F.conv2d(F.conv2d(x, conv0.weight[:8], conv0.bias[:8]), conv1.weight[:8, :8], conv1.bias[:8])
             for x in batches]
    expected = torch.stack([t.var(dim=(0, 2, 3), unbiased=True) for t in h]).mean(0)
    torch.testing.assert_close(a.running_var, expected, rtol=1e-5, atol=1e-6)


def test_convert_sync_batchnorm_keeps_students_and_names():
    torch.manual_seed(0)
    an = anfast.adjoin(SmallCNN(), alpha=2, policy="all", round_to=4, input_size=(3, 9, 9)).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        before = an(x)
    keys = list(an.state_dict())
    anfast.nn.convert_sync_batchnorm(an)
    assert isinstance(an.stem_bn, nn.SyncBatchNorm) and isinstance(an.stem_bn, anfast.nn.AdjoinedBatchNorm2d)
    assert isinstance(an.stem_bn.student_norms[0], nn.SyncBatchNorm)
    assert list(an.state_dict()) == keys
    with torch.no_grad():  # eval mode: running statistics, no communication
        after = an(x)
    assert torch.equal(before.base, after.base) and torch.equal(before.student, after.student)


class Norm1d(nn.Module):
    """BatchNorm1d on a map's (N, C, H * W) and on pooled (N, C) features (RepViT's head)."""

    def __init__(self):
        super().__init__()
        self.a, self.seq, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm1d(16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.bn(self.seq(F.relu(self.a(x)).flatten(2)).mean(2)))


def test_batchnorm1d_keeps_each_networks_statistics_and_exports(tmp_path):
    """Each BatchNorm1d gets an adjoined norm: a train step moves the base's running
    statistics exactly as the model's and the student's as a BatchNorm1d of the student's
    leading channels; the student, computed by hand, exports and loads as BatchNorm1d; the
    norms become SyncBatchNorm under convert_sync_batchnorm, students included."""
    torch.manual_seed(0)
    model = Norm1d().double()
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8))
    assert type(an.bn) is anfast.nn.AdjoinedBatchNorm1d and an.layer_widths["bn"].student_out == (8,)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        an.train()(x), model.train()(x)  # one step of statistics, each network its own
        y = F.relu(F.conv2d(x, model.a.weight[:8], model.a.bias[:8], padding=1)).flatten(2)
        # What each student norm saw: the student's leading 8 channels, normalised by batch
        # statistics in train mode; running means start at 0, momentum 0.1.
        seen = {"seq": y.mean((0, 2)), "bn": F.batch_norm(y, None, None, model.seq.weight[:8], model.seq.bias[:8],
                                                          training=True).mean(2).mean(0)}
        for name, mean in seen.items():
            norm = an.get_submodule(name)
            torch.testing.assert_close(norm.running_mean, model.get_submodule(name).running_mean, rtol=0, atol=1e-15)
            torch.testing.assert_close(norm.student_norms[0].running_mean, 0.1 * mean, rtol=0, atol=1e-15)
        an.eval(), model.eval()
        seq, bn = an.seq.student_norms[0], an.bn.student_norms[0]
        h = F.batch_norm(y, seq.running_mean, seq.running_var, seq.weight, seq.bias, eps=seq.eps).mean(2)
        h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        expected = F.linear(h, model.fc.weight[:, :8], model.fc.bias)
        out = an(x)
        assert (out.base - model(x)).abs().max() <= 1e-12 and (out.student - expected).abs().max() <= 1e-12
        student = anfast.export_student(an, path=tmp_path / "student").eval()
        assert type(student.bn) is nn.BatchNorm1d and student.bn.num_features == 8
        assert json.loads((tmp_path / "student" / "config.json").read_text())["layers"]["bn"]["type"] == "BatchNorm1d"
        loaded = anfast.load_student(tmp_path / "student", model=Norm1d()).double().eval()
        assert (loaded(x) - expected).abs().max() <= 1e-12
        anfast.nn.convert_sync_batchnorm(an)
        assert type(an.bn) is anfast.nn.AdjoinedSyncBatchNorm1d and isinstance(an.bn.student_norms[0], nn.SyncBatchNorm)
        assert torch.equal(an(x).student, out.student)  # eval mode: running statistics, no communication


def test_a_refused_base_checkpoint_leaves_the_network_as_it_was():
    """load_base_state_dict checks keys and shapes before it loads anything: a checkpoint
    with another classifier, or of another depth, used to overwrite every tensor that
    matched before the refusal, leaving the students' norms out of step with the base."""
    an = anfast.adjoin("resnet18", num_classes=10, alpha=4, input_size=SIZE)
    before = {k: v.clone() for k, v in an.state_dict().items()}
    for other in (torchvision.models.resnet18(num_classes=1000), torchvision.models.resnet34(num_classes=10)):
        with pytest.raises(ValueError, match="does not match the base network, nothing was loaded"):
            an.load_base_state_dict(other.state_dict())
        assert all(torch.equal(v, before[k]) for k, v in an.state_dict().items())
    with pytest.raises(ValueError, match=r"other shapes \['fc.weight \(1000, 512\) \(the base: \(10, 512\)\)'"):
        an.load_base_state_dict(torchvision.models.resnet18(num_classes=1000).state_dict())
    with pytest.raises(ValueError, match=r"unexpected \['layer1.2.conv1.weight'.* and \d+ more"):
        an.load_base_state_dict(torchvision.models.resnet34(num_classes=10).state_dict())


class _ConstantAndKeywordCat(nn.Module):
    """A tensor made in forward (traced as a _tensor_constant buffer) and torch.cat by keyword."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(3, 64, 3), nn.Conv2d(3, 64, 3), nn.Conv2d(128, 4, 1)

    def forward(self, x):
        return self.b(torch.cat(tensors=[self.a(x), self.c(x) * torch.tensor(2.0)], dim=1))


def test_keyword_concat_and_tensor_constants_adjoin_and_export_exactly():
    torch.manual_seed(0)
    model = _ConstantAndKeywordCat()
    an = anfast.adjoin(model, policy="all", input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    an.double()
    out = an(x)
    assert torch.allclose(out.base, model.double()(x))
    fresh = _ConstantAndKeywordCat()
    fresh.load_state_dict(an.base_state_dict())  # strict: no _tensor_constant0 key
    student = anfast.export_student(an)
    width = an.layer_widths["a"].student_out[0]
    expected = F.conv2d(torch.cat([F.conv2d(x, model.a.weight[:width], model.a.bias[:width]),
                                   2 * F.conv2d(x, model.c.weight[:width], model.c.bias[:width])], 1),
                        model.b.weight[:, torch.cat([torch.arange(width), 64 + torch.arange(width)])], model.b.bias)
    assert torch.allclose(student(x), expected) and torch.allclose(out.students[0], expected)


def test_an_adjoined_network_pickles_and_torch_saves_as_itself(tmp_path):
    import pickle

    an = anfast.adjoin("resnet18", num_classes=10, alpha=(2, 4), input_size=SIZE).eval()
    torch.save(an, tmp_path / "an.pt")
    x = torch.randn(2, *SIZE)
    expected = an(x)
    for copied in (pickle.loads(pickle.dumps(an)), torch.load(tmp_path / "an.pt", weights_only=False)):
        assert isinstance(copied, anfast.AdjoinedNetwork) and copied.alphas == an.alphas
        assert not copied.training and copied.layer_widths == an.layer_widths
        out = copied(x)
        assert torch.equal(out.base, expected.base)
        assert all(torch.equal(a, b) for a, b in zip(out.students, expected.students))
        assert torch.equal(anfast.export_student(copied, index=1)(x), expected.students[1])


class Unread(nn.Module):
    """A spare head, persistent and non-persistent buffers that forward never reads (one on
    a layer that adjoin replaces), and a second name of a layer forward calls."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 1), nn.Linear(8, 4)
        self.head = self.fc  # tied: one module, two names
        self.spare = nn.Sequential(nn.Linear(16, 3))
        self.register_buffer("order", torch.randperm(7))
        self.a.register_buffer("scratch", torch.randn(5), persistent=False)
        self.a.register_buffer("calibrated", torch.tensor(3))

    def forward(self, x):
        return self.fc(self.b(F.relu(self.a(x))).mean((2, 3)))


def test_state_that_forward_never_reads_survives_export_and_checkpoints(tmp_path):
    import pickle

    torch.manual_seed(0)
    model = Unread()
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 8, 8))
    assert list(an.base_state_dict()) == list(model.state_dict())  # same keys, same order
    trainable = {name for name, _ in an.named_parameters()}
    assert "spare.0.weight" not in trainable and "a.weight" in trainable  # no gradient, no DDP hook
    for exported in (anfast.export_base(an, path=tmp_path / "base"), anfast.export_student(an),
                     anfast.load_student(tmp_path / "base", model=Unread())):
        state = exported.state_dict()
        for key in ("spare.0.weight", "spare.0.bias", "order"):
            assert torch.equal(state[key], model.state_dict()[key]), key
        assert isinstance(exported.spare[0].weight, nn.Parameter)
    assert torch.equal(anfast.export_student(an).a.scratch, model.a.scratch)
    # A checkpoint of the original class loads into the base, unread entries included.
    other = Unread()
    an.load_base_state_dict(other.state_dict())
    assert torch.equal(an.base_state_dict()["spare.0.weight"], other.spare[0].weight)
    for copied in (pickle.loads(pickle.dumps(an)), copy.deepcopy(an)):
        assert list(copied.base_state_dict()) == list(model.state_dict())
        assert torch.equal(copied.base_state_dict()["order"], other.order)
        assert torch.equal(anfast.export_base(copied).a.scratch, model.a.scratch)
    # The tied name follows training (and a move to float64), in the base and the student.
    an = an.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    trained = an(x)
    (trained.base.sum() + trained.student.sum()).backward()
    torch.optim.SGD(an.parameters(), lr=0.5).step()
    an.eval()
    with torch.no_grad():
        out = an(x)
        for exported, expected in ((anfast.export_base(an), out.base), (anfast.export_student(an), out.student)):
            exported.eval()
            assert exported.head is exported.fc and torch.equal(exported.a.calibrated, model.a.calibrated)
            assert (exported(x) - expected).abs().max() <= 1e-12


class _Named(nn.Module):
    """A buffer that forward never reads, named like an attribute of the adjoined network."""

    def __init__(self, name):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.register_buffer(name, torch.zeros(2))

    def forward(self, x):
        return self.a(x).mean((2, 3))


@pytest.mark.parametrize("name", ["alphas", "meta", "_unread"])
def test_unread_state_named_like_an_adjoined_network_attribute_is_refused(name):
    with pytest.raises(AdjoinError, match=rf"^{name}: forward never reads it, .* {name!r} is an attribute "
                                          r"of the adjoined network \(AdjoinedNetwork\); rename it"):
        anfast.adjoin(_Named(name), input_size=(3, 8, 8))


def test_models_named_by_string_build_where_their_builder_computes_with_tensors():
    """torchvision's RegNets compute their widths with tensors (.tolist()), which the meta
    device cannot run: the size check and load_student build them with each tensor moved
    to meta as it is registered. GoogLeNet's init_weights loads nothing and is accepted."""
    from anfast.models import create_model
    from anfast.models.registry import build_on_meta, fetching_kwargs

    model, source = create_model("regnet_y_400mf", num_classes=10)
    assert source == {"torchvision": "regnet_y_400mf", "kwargs": {"num_classes": 10}}
    reference = torchvision.models.regnet_y_400mf(num_classes=10)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]
    on_meta = build_on_meta(lambda: torchvision.models.regnet_y_400mf(num_classes=10))
    assert {t.device.type for t in (*on_meta.parameters(), *on_meta.buffers())} == {"meta"}
    with torch.device("meta"):
        assert create_model("regnet_x_400mf", num_classes=10)[0].stem[0].weight.is_meta
    assert fetching_kwargs(["init_weights", "weights_path"]) == ["weights_path"]
    assert create_model("googlenet", num_classes=10, aux_logits=False, init_weights=True)[1]["kwargs"][
        "init_weights"] is True
    # Auxiliary outputs exist in train mode only, which adjoin refuses: off unless asked for.
    model, source = create_model("googlenet", num_classes=10, init_weights=False)
    assert model.aux1 is None and source["kwargs"] == {"num_classes": 10, "init_weights": False, "aux_logits": False}
    assert create_model("inception_v3", aux_logits=True, init_weights=False)[0].AuxLogits is not None


def test_an_unknown_backend_is_refused_by_adjoin_before_tracing():
    with pytest.raises(AdjoinError, match=r"backend='cudnn' is no backend; choose one of gemm, cuda, triton, "
                                          r"torch, or leave it out for auto"):
        anfast.adjoin(SmallCNN(), backend="cudnn", input_size=SIZE)


class _NumberedChannels(_Headed):
    """``a``'s 16 channels written as a number in forward: the code runs at that width in
    every network and in the exported student, so ``a`` keeps full width."""

    OPS = {"reshape": lambda y: y.reshape(-1, 16, 8, 8), "expand": lambda y: y.expand(2, 16, 8, 8),
           "new_zeros": lambda y: y + y.new_zeros(2, 16, 8, 8),
           "made in forward": lambda y: y + torch.ones(1, 16, 1, 1, dtype=y.dtype)}

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def ops(self, y):
        return self.OPS[self.op](y)


@pytest.mark.parametrize("op", _NumberedChannels.OPS)
def test_a_channel_count_written_in_forward_keeps_full_width(op):
    node = {"reshape": r"reshape \(call_method reshape\) sizes as 16 in the model's code",
            "expand": r"expand \(call_method expand\) sizes as 16 in the model's code",
            "new_zeros": r"new_zeros \(call_method new_zeros\) sizes as 16 in the model's code",
            "made in forward": r"of ones \(1, 16, 1, 1\), which add \(call_function add\) meets"}[op]
    _assert_runs_whole(_NumberedChannels(op), "a", rf"channels {node}")


class _CountOfAnother(nn.Module):
    """``a``'s channels viewed by ``b``'s count: 48 // 3 = 16 at full width only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 48, 1)
        self.head, self.fc = nn.Conv2d(16, 32, 1), nn.Linear(32, 4)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        y = y.view(z.shape[0], z.shape[1] // 3, 8, 8) * torch.sigmoid(z.mean(1, keepdim=True))
        return self.fc(F.relu(self.head(y)).mean((2, 3)))


def test_channels_sized_by_another_groups_count_keep_full_width():
    """a's view takes b's channel count: a and b keep full width (at alpha 2, 24 // 3 = 8
    only by chance of the ratio; round_to breaks it), head after them shrinks."""
    why = r"channels view \(call_method view\) sizes by the channel count of b"
    _assert_runs_whole(_CountOfAnother(), "a", why)
    an = anfast.adjoin(_CountOfAnother(), alpha=2, policy="all", input_size=(3, 8, 8))
    assert re.fullmatch(why, {g.name: g.fixed for g in an.width_groups}["b"])


def _sixteen_channels(y):
    """A function fx does not trace into (torch.fx.wrap below) that fixes a channel count."""
    return y.reshape(y.shape[0], 16, y.shape[2], y.shape[3])


torch.fx.wrap("_sixteen_channels")


def test_a_forward_that_fixes_a_channel_count_out_of_sight_is_refused_by_adjoin_naming_the_node():
    """Inside a function fx keeps whole, the count is out of anfast's sight: the model
    traces and runs at full width and fails only at the students' width; adjoin says
    where, instead of the network's first call."""
    class Hidden(_Headed):
        def ops(self, y):
            return _sixteen_channels(y)

    model = Hidden()
    model(torch.zeros(2, 3, 8, 8))  # the original runs
    with pytest.raises(AdjoinError, match=r"Hidden runs, but its students fail at _sixteen_channels\w* "
                                          r"\(call_function _sixteen_channels\): RuntimeError: .*; the forward "
                                          r"fixes a channel count there out of anfast's sight"):
        anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8))
    kept = anfast.adjoin(model, alpha=2, policy={"head": 2}, input_size=(3, 8, 8))  # a at full width
    assert kept.layer_widths["head"].student_out == (16,) and kept.layer_widths["a"].student_out == (16,)


def test_a_policy_that_shrinks_nothing_warns_once_students_would_equal_the_base():
    small = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1))
    with pytest.warns(UserWarning, match=r"no layer of Sequential shrinks under this policy \('paper' shrinks "
                                         r"convs whose in and out channels both exceed 64\)"):
        an = anfast.adjoin(small, input_size=(3, 8, 8))
    assert all(w == g.channels for g in an.width_groups for w in g.widths)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert anfast.adjoin(small, alpha=1, policy="all", input_size=(3, 8, 8))  # DAN's full-width start
        shrunk = anfast.adjoin(small, policy="all", input_size=(3, 8, 8))
    assert shrunk.layer_widths["0"].student_out == (8,)
