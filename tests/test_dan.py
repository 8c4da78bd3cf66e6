"""DAN: the cost model against anfast.profile, the masks against the derived student,
the search loop and arch.json, the penalty's pull toward the target, the CLI."""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import anfast
from anfast.dan import (ChoiceGates, CostModel, DanError, SearchConfig, SearchSpace, StudentMasks, derive, read_arch,
                        search, search_training, temperature)
from anfast.cli.search import config_from_args, register
from helpers import assert_close_rel, draw_zero_parameters, hand_student_width


class TinyResidualNet(nn.Module):
    """A residual add (two producers, one group), a depthwise conv, a conv with bias and no norm."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.shortcut = nn.Conv2d(16, 24, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(24)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.head = nn.Conv2d(24, 40, 1)  # bias, no norm: masked at the conv itself
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(y + self.shortcut_bn(self.shortcut(x)))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.head(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _one_hot_profile(source, space, choice, image_size, **model_kwargs):
    """anfast.profile of the student adjoin builds for one choice per group (the oracle)."""
    alphas = space.alphas(choice)
    policy = {producer: alphas[group.name] for group in space.groups for producer in group.producers}
    network = anfast.adjoin(source, alpha=1, policy=policy, input_size=(3, image_size, image_size), **model_kwargs)
    return anfast.profile(anfast.export_student(network), (3, image_size, image_size))


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def torchvision_space(request):
    """(arch, network, space, cost) of a 10-class torchvision model at 32 px, built once."""
    network = anfast.adjoin(request.param, alpha=1, policy="all", input_size=(3, 32, 32), num_classes=10)
    space = SearchSpace.from_network(network)
    return request.param, network, space, CostModel(network, space, (3, 32, 32))


def test_one_hot_cost_equals_profile_of_derived_student(torchvision_space):
    arch, network, space, cost = torchvision_space
    image_size = 32
    assert cost.base == anfast.profile(anfast.export_base(network), (3, image_size, image_size))
    generator = torch.Generator().manual_seed(7)
    narrowest = torch.full((len(space.groups),), len(space.choices) - 1)
    for choice in (narrowest, torch.randint(0, len(space.choices), (len(space.groups),), generator=generator)):
        expected = _one_hot_profile(arch, space, choice, image_size, num_classes=10)
        assert cost.exact(choice) == expected, f"{arch}: choice {choice.tolist()}"
    assert cost.exact(torch.zeros(len(space.groups), dtype=torch.long)) == cost.base


def test_tiny_model_cost_and_masks_match_the_derived_student():
    torch.manual_seed(0)
    model = TinyResidualNet()
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 9, 9)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    # conv2 and shortcut meet in the residual add: one group, masked after both norms.
    grouped = {p for g in space.groups for p in g.producers if len(g.producers) > 1}
    assert {"conv2", "shortcut", "depthwise"} <= grouped
    assert space.mask_points["head"] == space.group_names.index("head")
    assert "conv2" not in space.mask_points and "bn2" in space.mask_points

    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([2, 1, 0, 2], [1, 2, 2, 0], [0, 0, 1, 1]))


def _assert_one_hot_gates_give_the_derived_student(model, network, space, choices, image_size=9):
    """For each choice (one index per group): the cost model's count is anfast.profile's of
    the student adjoin derives, and the masked full-width student computes that student."""
    input_size = (3, image_size, image_size)
    cost = CostModel(network, space, input_size)
    masks = StudentMasks(network, space)
    images = torch.randn(5, *input_size, dtype=torch.float64)
    for choice in choices:
        choice = torch.tensor(choice[: len(space.groups)])
        alphas = space.alphas(choice)
        policy = {p: alphas[g.name] for g in space.groups for p in g.producers}
        derived = anfast.adjoin(model, alpha=1, policy=policy, round_to=space.round_to, input_size=input_size)
        student = anfast.export_student(derived.double()).eval()
        assert cost.exact(choice) == anfast.profile(student, input_size)
        masks.set_gates(nn.functional.one_hot(choice, len(space.choices)).double())
        with torch.no_grad():
            masked, expected = network(images).student, student(images)
        error = float((masked - expected).norm() / expected.norm())
        assert error < 1e-12, f"choice {choice.tolist()}: masked full-width student differs by {error:.2e}"
    masks.remove()


class GatedNet(nn.Module):
    """stem -> conv a -> a gate on a's output, by name -> conv b -> linear head."""

    GATES = {  # name -> (the gate, whether a's channels are left out of a search)
        # Each width choice's mean and amax over its own leading channels (StudentReduction):
        # a is searched. So is a softmin along them, zero-padded beyond each width.
        "CBAM spatial: mean and amax": (lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            [y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1))), False),
        # torch.max(y, 1) returns values and indices; the values alone are read: mixed too.
        "CBAM spatial: max .values, mean(axis=1)": (lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            [y.max(1, keepdim=True).values, y.mean(axis=1, keepdim=True)], 1))), False),
        "CBAM spatial: torch.max(y, 1)[0], min": (lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            [torch.max(y, 1)[0].unsqueeze(1), y.min(1, keepdim=True)[0]], 1))), False),
        # The indices read too, which no mix of widths gives: a is left out.
        "argmax by torch.max(y, 1)[1]": (lambda y, m: y * torch.sigmoid(m.gate(torch.cat(
            [torch.max(y, 1, keepdim=True)[1].to(y.dtype), y.mean(1, keepdim=True)], 1))), True),
        "softmin over the channels": (lambda y, m: y * nn.functional.softmin(y, 1), False),
        # StarReLU's learnable scalar bias would fill masked channels: each choice shifts its own.
        "StarReLU: scale * relu(y) ** 2 + bias": (lambda y, m: 1.3 * torch.relu(y) ** 2 + m.shift, False),
        # Each width choice's GroupNorm normalises its own leading channels: a is searched.
        "group norm": (lambda y, m: m.norm(y), False),
        # ECA's Conv1d sees a mask's zeros beyond the student's width as the student's zero
        # padding: a is searched, the Conv1d's FLOPs counted per channel.
        "ECA": (lambda y, m: y * torch.sigmoid(m.eca(y.mean((2, 3)).view(y.shape[0], 1, -1))).view(
            y.shape[0], -1, 1, 1), False),
        # GC's attention pooling pools each channel alone: searched, its matmul counted.
        "GC attention pooling": (lambda y, m: y * torch.sigmoid((y.flatten(2).unsqueeze(1) @ torch.softmax(
            m.attn(y).flatten(2), -1).unsqueeze(3)).view(y.shape[0], -1, 1, 1)), False),
        # Sliced channels keep full width, so they are not searched either.
        "CSP halves": (lambda y, m: torch.cat([y.split(8, 1)[0], torch.relu(y[:, 8:])], 1), True),
        # Pools over space: masked channels pool to zero, a is searched. fc1 runs twice.
        "CBAM channel: one MLP on two pools": (lambda y, m: y * torch.sigmoid(
            m.fc2(torch.relu(m.fc1(y.mean((2, 3))))) + m.fc2(torch.relu(m.fc1(y.amax((2, 3)))))
        )[:, :, None, None], False),
    }

    def __init__(self, gate: str):
        super().__init__()
        self.gate_name = gate
        self.stem, self.a = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.gate, self.b, self.fc = nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 3)
        self.norm, self.fc1, self.fc2 = nn.GroupNorm(2, 16, affine=False), nn.Linear(16, 8), nn.Linear(8, 16)
        self.eca, self.attn = nn.Conv1d(1, 1, 3, padding=1, bias=False), nn.Conv2d(16, 1, 1)
        self.shift = nn.Parameter(torch.tensor([0.75]))

    def forward(self, x):
        y = self.GATES[self.gate_name][0](torch.relu(self.a(torch.relu(self.stem(x)))), self)
        return self.fc(torch.relu(self.b(y)).mean((2, 3)))


@pytest.mark.parametrize("gate", list(GatedNet.GATES))
def test_a_group_reduced_over_is_searched_per_width_choice_or_left_out_so_masks_give_the_derived_student(gate):
    """Masked to zero at full width, a's channels would still count in a mean, max or
    softmin over them: the student computes the gates' mix of the op on each choice's
    leading channels (a StudentReduction; of torch.max(y, 1), the values), or, where the
    model reads torch.max's indices, a's group is left out of the search (full width in
    every student). The masked network computes each derived
    student exactly, at the cost the cost model gives it (fc1, called twice, counted twice). ECA's
    Conv1d and GC's pooling act on each channel with zeros beyond the student's width, and
    an adopted GroupNorm normalises each choice's channels alone: a is searched, the
    Conv1d's and the matmul's FLOPs counted per channel."""
    torch.manual_seed(0)
    model = GatedNet(gate)
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 9, 9)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert ("a" not in space.group_names) == GatedNet.GATES[gate][1], space.group_names
    assert {"stem", "b"} <= set(space.group_names)
    narrowest = [len(space.choices) - 1] * len(space.groups)
    _assert_one_hot_gates_give_the_derived_student(model, network, space, (narrowest, [1, 2, 0, 1, 2], [0] * 5))


def test_a_cbam_resnet_searches_the_residual_streams_its_spatial_gates_reduce_over():
    """timm's ResNet-18-D with CBAM in every block: each spatial gate takes the mean and
    amax over its block's output channels, the residual stream's. Computed per width
    choice (16 StudentReductions), every group that can shrink is searched, and the
    masked network computes each derived student exactly, at the cost the cost model gives."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # Each block's last BN starts at zero: its gate would see zeros.
    model = draw_zero_parameters(timm.create_model("resnet18d", num_classes=10, block_args={"attn_layer": "cbam"}))
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 16, 16)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert len(space.groups) == sum(not g.fixed for g in network.width_groups) == 30
    assert len(space.reduction_points) == 16 and not any(g.reduced_by for g in space.groups)
    generator = torch.Generator().manual_seed(0)
    choices = [torch.randint(0, 3, (30,), generator=generator).tolist() for _ in range(2)]
    _assert_one_hot_gates_give_the_derived_student(model, network, space, choices, image_size=16)


@pytest.mark.parametrize("scale", ["none", "(C,) viewed as (1, C, 1, 1)"])
def test_a_convnext_block_is_searched_through_its_layer_norms_and_hidden_features(scale):
    """ConvNeXt's residual stream (stem, depthwise conv, fc2: normalised by both
    LayerNorms, on (N, H, W, C) and on pooled (N, C)) and its hidden features (Linear to 4C)
    are searched. The norms normalise each choice's leading channels, the linears are
    masked along the last axis; the masked network computes each derived student
    exactly, at the cost the cost model gives it (a linear on channels-last applies its
    weight at every H * W position; the layer scale counts its channels)."""
    from test_adjoin import ChannelsLastBlock

    torch.manual_seed(0)
    model = ChannelsLastBlock(scale)
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert space.group_names == ["stem", "fc1"]
    assert space.norm_points == {"norm": 0, "head_norm": 0} and not set(space.norm_points) & set(space.mask_points)
    # The depthwise conv's output reaches the LayerNorm through a permute alone: no mask.
    assert space.mask_points == {"stem": 0, "fc1": 1, "fc2": 0}
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([0, 2], [1, 0], [2, 1], [2, 2]),
                                                   image_size=8)


def test_split_attention_run_whole_is_not_searched_and_the_convs_around_it_are():
    """ResNeSt's split attention runs whole: the groups it reads (conv's and fc2's outputs,
    the summed splits) are left out of the search; stem, fc1 and out are searched, and the
    masked network computes each derived student exactly, at the cost the cost model gives."""
    from test_adjoin import SplitAttention

    torch.manual_seed(0)
    model = SplitAttention()
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert space.group_names == ["stem", "fc1", "out"]
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([2, 2, 2], [1, 0, 2], [0, 2, 1]))


def test_batchnorm1d_groups_are_searched_and_masked_along_their_channels():
    """BatchNorm1d on (N, C, L) and on (N, C): the mask follows each norm's channel axis,
    and the masked network computes each derived student at its cost."""
    from test_adjoin import Norm1d

    torch.manual_seed(0)
    model = Norm1d()
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert space.group_names == ["a"]
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([0], [1], [2]), image_size=8)


@pytest.mark.parametrize("use", ["scale", "shift"])
def test_a_layer_scale_is_searched_with_its_group_and_counted_in_the_cost(use):
    """A per-channel scale (C, 1, 1) zeroes what the mask zeroed: its group is searched
    and the cost model counts its C parameters at the searched width. A per-channel shift
    would put its values in masked channels: that group is not searched."""
    class LayerScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
            self.b, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 3)
            self.vector = nn.Parameter(torch.rand(16, 1, 1) + 0.5)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            y = y + (self.a(y) * self.vector if use == "scale" else self.a(y) + self.vector)
            return self.fc(torch.relu(self.b(y)).mean((2, 3)))

    torch.manual_seed(0)
    model = LayerScaled()
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 9, 9)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert network.channel_vectors == {"vector": (0, "stem")}
    assert ("stem" in space.group_names) == (use == "scale") and "b" in space.group_names, space.group_names
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([0, 2], [1, 0], [2, 1]))


def test_weight_standardised_convs_standardise_each_choices_filters_over_its_own_inputs():
    """timm's ScaledStdConv2d standardises each filter over its input channels, and the
    student's over its own: the group it reads (stem) is searched, its student convolving
    with each choice's standardised filters (ScaledStdConv2d's scale for that fan-in),
    weighted by the gates. A grouped StdConv2dSame (its output in its input's group) keeps
    its fan-in (whole groups), so a mask is exact for it. The masked network computes
    each derived student exactly, at the cost the model gives it (the gain counted per
    channel)."""
    timm = pytest.importorskip("timm")

    class Standardised(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a = nn.Conv2d(3, 16, 3, padding=1), timm.layers.ScaledStdConv2d(16, 16, 3)
            self.c = timm.layers.StdConv2dSame(16, 16, 3, stride=2, groups=4)
            self.b, self.fc = nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 3)

        def forward(self, x):
            y = torch.relu(self.c(torch.relu(self.a(torch.relu(self.stem(x))))))
            return self.fc(torch.relu(self.b(y)).mean((2, 3)))

    torch.manual_seed(0)
    model = Standardised()
    with torch.no_grad():
        model.a.gain.add_(torch.randn_like(model.a.gain))
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 9, 9)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert space.group_names == ["stem", "a", "b"]  # c's groups in and out are one: a's
    assert space.standardised_points == {"a": 0}  # c is grouped: masked like any conv
    assert network.channel_vectors == {"a.gain": (0, "a")}
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([2, 2, 2], [1, 0, 2], [0, 1, 1],
                                                                           [2, 0, 0]))


class GroupNormed(nn.Module):
    """stem -> a -> GroupNorm(4 groups) -> b -> linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.norm, self.b, self.fc = nn.GroupNorm(4, 16), nn.Conv2d(16, 24, 1), nn.Linear(24, 3)

    def forward(self, x):
        y = torch.relu(self.norm(self.a(torch.relu(self.stem(x)))))
        return self.fc(torch.relu(self.b(y)).mean((2, 3)))


def test_a_group_norms_channels_are_searched_in_whole_groups():
    """The GroupNorm normalises each width choice's leading channels in its 4 groups, as
    the derived student's GroupNorm does: a is searched (in whole groups) with stem and b,
    and the masked network computes each derived student exactly, at the cost the cost
    model gives it."""
    torch.manual_seed(0)
    model = GroupNormed()
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 9, 9)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4, 8), round_to=1)
    assert space.group_names == ["stem", "a", "b"]
    assert space.widths[1].tolist() == [16, 8, 4, 4]  # 16 / 8 rounds up to one channel per group
    # The norm masks its own output; a, which feeds only the norm, needs no mask.
    assert space.norm_points == {"norm": 1} and "a" not in space.mask_points and "norm" not in space.mask_points
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([2, 3, 2], [1, 2, 0], [0, 1, 1],
                                                                           [3, 0, 3]))


class ResponseNormed(nn.Module):
    """A ConvNeXt-V2 block's MLP (Woo et al. 2023): expand, GELU, timm's GRN, project back,
    residual; on (N, H, W, C) with Linear layers or on (N, C, H, W) with 1x1 convs. GRN's
    weight and bias are drawn (timm starts them at zero: GRN would be the identity)."""

    def __init__(self, channels_last: bool):
        super().__init__()
        GlobalResponseNorm = pytest.importorskip("timm.layers.grn").GlobalResponseNorm
        self.channels_last = channels_last
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        layer = nn.Linear if channels_last else functools.partial(nn.Conv2d, kernel_size=1)
        self.fc1, self.fc2 = layer(16, 32), layer(32, 16)
        self.grn = GlobalResponseNorm(32, channels_last=channels_last)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.grn.weight.normal_()
            self.grn.bias.normal_()

    def forward(self, x):
        x = self.stem(x)
        y = x.permute(0, 2, 3, 1) if self.channels_last else x
        y = self.fc2(self.grn(F.gelu(self.fc1(y))))
        y = y.permute(0, 3, 1, 2) if self.channels_last else y
        return self.head((x + y).mean((2, 3)))


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_a_grn_normalises_each_choices_channels_and_adds_its_bias_there_alone(channels_last):
    """GRN divides each channel's spatial norm by their mean over the channels and adds a
    bias: a mask's zeros would count in the mean and the bias would fill masked channels.
    Adopted as a layer, it outputs each choice's GRN of its leading channels, zero beyond:
    fc1's group is searched, and the masked network computes each derived student
    exactly, at the cost the cost model gives it (GRN's two vectors counted per channel)."""
    torch.manual_seed(0)
    model = ResponseNormed(channels_last)
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 9, 9)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert space.group_names == ["stem", "fc1"]
    assert space.norm_points == {"grn": 1} and "grn" not in space.mask_points
    assert network.channel_vectors == {"grn.weight": (0, "fc1"), "grn.bias": (0, "fc1")}
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([0, 2], [1, 0], [2, 1], [2, 2], [0, 1]))


def test_group_names_are_unique_where_nodes_are_named_like_layers():
    """A buffer read twice (two get_attr nodes) and a channel mean computed before a layer
    named "mean" (the mean's node takes the name): DAN keys choices by group name."""
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.mean, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 3)
            self.register_buffer("window", torch.ones(16, 1, 3, 3) / 9)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = nn.functional.conv2d(nn.functional.conv2d(y, self.window, padding=1, groups=16), self.window,
                                     padding=1, groups=16)
            return self.fc(self.mean(y.mean(1, keepdim=True)).mean((2, 3)))

    network = anfast.adjoin(Named(), alpha=1, policy="all", input_size=(3, 8, 8))
    names = [g.name for g in network.width_groups]
    assert len(set(names)) == len(names) and "mean" in names and "mean'" in names, names
    assert "mean" in SearchSpace.from_network(network).group_names


class Dense(nn.Module):
    """DenseNet's concats (Huang et al. 2017): each layer reads the batch-normed concat of
    everything before it; a part that is not searched (the pooled image); a transition,
    and a linear head on the pooled concat."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.norm1, self.conv1 = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(24), nn.Conv2d(24, 8, 3, padding=1, bias=False)
        self.norm3, self.transition = nn.BatchNorm2d(35), nn.Conv2d(35, 16, 1)
        self.head_norm, self.fc = nn.BatchNorm2d(24), nn.Linear(24, 3)

    def forward(self, x):
        features = [torch.relu(self.stem_bn(self.stem(x)))]
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            features.append(conv(torch.relu(norm(torch.cat(features, 1)))))
        y = self.transition(torch.relu(self.norm3(torch.cat([*features, x], 1))))  # the image: full width
        y = torch.cat([F.avg_pool2d(y, 2), F.avg_pool2d(features[-1], 2)], 1)
        return self.fc(torch.relu(self.head_norm(y)).mean((2, 3)))


def test_densenet_concats_are_searched_part_by_part():
    """A layer reading a concat reads each part's searched width (the cost model sums their
    monomials); a batch norm over one is masked after by its parts' masks end to end (ones
    for the image). The masked network computes each derived student exactly, at the cost
    the cost model gives it."""
    torch.manual_seed(0)
    model = Dense()
    with torch.no_grad():
        for norm in (model.norm1, model.norm2, model.norm3, model.head_norm):
            norm.bias.add_(torch.rand_like(norm.bias) + 0.5)  # a masked channel would show its bias
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert space.group_names == ["stem", "conv1", "conv2", "transition"]
    assert space.concat_points == {"norm2": ((0, 16), (1, 8)), "norm3": ((0, 16), (1, 8), (2, 8), (None, 3)),
                                   "head_norm": ((3, 16), (2, 8))}
    _assert_one_hot_gates_give_the_derived_student(model, network, space, (
        [2, 2, 2, 2], [1, 0, 2, 1], [0, 1, 1, 2], [2, 1, 0, 0]), image_size=8)


@pytest.mark.parametrize("reader", ["layer norm", "standardised conv"])
def test_a_norm_over_a_concat_of_two_shrinking_parts_searches_the_last(reader):
    """Over a concat of two parts that could shrink, adjoin keeps the first whole for a
    LayerNorm (each network normalises the concat's leading channels): the search shrinks
    the last and the conv after. A standardised conv, which adjoin slices on both parts,
    leaves both unsearched: a choice's channels would not be the concat's leading ones."""
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(16) if reader == "layer norm" else StdConv2d(16, 16, 1)
            self.c, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if reader == "layer norm" else self.norm(y)
            return self.fc(torch.relu(self.c(y)).mean((2, 3)))

    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = Normed()
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    if reader == "layer norm":
        assert space.group_names == ["b", "c"] and space.leading_channels == {"norm": 8}
        assert "only its last part shrinks" in next(g.fixed for g in network.width_groups if g.name == "a")
    else:
        assert space.group_names == ["norm", "c"] and space.leading_channels == {}
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([0, 1], [1, 2], [2, 0]), image_size=8)


@pytest.mark.parametrize("last", [True, False], ids=["shrinking-part-last", "shrinking-part-first"])
@pytest.mark.parametrize("reader", ["layer norm", "group norm", "standardised conv"])
def test_a_norm_over_a_concat_whose_last_part_alone_shrinks_searches_that_part(reader, last):
    """RDNet's transitions: a norm (or a standardised conv) reads a concat of a part that
    keeps full width (a grouped conv anfast cannot slice) and one that can shrink. Last, the
    part is searched: each choice's channels are the concat's leading 12 + width, and the
    masked network computes each derived student. First, it is not: a choice's channels
    would not be the concat's leading ones."""
    from timm.layers import LayerNorm2d, StdConv2d

    class ConcatNormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 12, 3, padding=1, groups=3)  # 1 in, 4 out per group: full width
            self.b = nn.Conv2d(3, 16, 3, padding=1)
            self.reader = {"layer norm": LayerNorm2d(28), "group norm": nn.GroupNorm(4, 28),
                           "standardised conv": StdConv2d(28, 8, 1)}[reader]
            self.c, self.fc = nn.Conv2d(8 if reader == "standardised conv" else 28, 8, 1), nn.Linear(8, 3)

        def forward(self, x):
            parts = [self.a(x), self.b(x)] if last else [self.b(x), self.a(x)]
            y = self.reader(torch.relu(torch.cat(parts, 1)))
            return self.fc(torch.relu(self.c(y)).mean((2, 3)))

    torch.manual_seed(0)
    model = ConcatNormed()
    if reader != "standardised conv":
        with torch.no_grad():
            model.reader.weight.add_(torch.randn(28)), model.reader.bias.add_(torch.randn(28))
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    standardised = reader == "standardised conv"
    assert space.group_names == ["b"] * last + ["reader"] * standardised + ["c"]
    points = space.standardised_points if standardised else space.norm_points
    assert (points, space.leading_channels) == (({"reader": 0}, {"reader": 12}) if last else ({}, {}))
    _assert_one_hot_gates_give_the_derived_student(model, network, space, ([0, 1, 2], [1, 2, 0], [2, 0, 1]),
                                                   image_size=8)


def test_expected_cost_is_differentiable_and_interpolates():
    network = anfast.adjoin(TinyResidualNet(), alpha=1, policy="all", input_size=(3, 8, 8))
    space = SearchSpace.from_network(network, choices=(1, 2, 4, 8))
    cost = CostModel(network, space, (3, 8, 8))
    gates = ChoiceGates(space)
    weights = gates(tau=1.0)
    expected = cost.expected(weights)
    expected["flops"].backward()
    # More weight on a wider choice means more FLOPs: the gradient falls across choices.
    assert (gates.theta.grad[:, 0] > gates.theta.grad[:, -1]).all()
    widest = cost.exact(torch.zeros(len(space.groups), dtype=torch.long))
    narrowest = cost.exact(torch.full((len(space.groups),), 3))
    for kind in ("flops", "params"):
        assert narrowest[kind] < float(expected[kind].detach()) < widest[kind]


def test_gates_noise_and_temperature():
    network = anfast.adjoin(TinyResidualNet(), alpha=1, policy="all", input_size=(3, 8, 8))
    space = SearchSpace.from_network(network)
    frozen = ChoiceGates(space, frozen_noise=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(frozen(2.0), frozen(2.0))
    resampled = ChoiceGates(space)
    assert not torch.equal(resampled(2.0), resampled(2.0))
    assert torch.allclose(resampled(0.5).sum(dim=-1), torch.ones(len(space.groups)))
    assert temperature(0) == 15.0 and math.isclose(temperature(10), 15.0 * 0.956**10)
    short = SearchConfig(target_flops=0.5, train=search_training(epochs=3))
    assert short.resolved_tau_schedule() == "anneal"
    assert short.tau_at(0, 30, 90) == 1.0 and math.isclose(short.tau_at(89, 30, 90), 0.2)
    assert math.isclose(short.tau_at(45, 30, 90), 1.0 * 0.2 ** (45 / 89))
    long = SearchConfig(target_flops=0.5, train=search_training(epochs=100))
    assert long.resolved_tau_schedule() == "paper" and math.isclose(long.tau_at(95, 30, 3000), 15.0 * 0.956**3)


@pytest.mark.parametrize("model", [TinyResidualNet, Dense])
def test_moments_and_expected_penalty_equal_enumeration(model):
    """E_p[cost], E_p[cost^2] and E_p[R] against a sum over every architecture (with
    DenseNet's concats: a layer's input channels are the sum of its parts')."""
    network = anfast.adjoin(model(), alpha=1, policy="all", input_size=(3, 8, 8))
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    cost = CostModel(network, space, (3, 8, 8))
    probabilities = torch.softmax(torch.randn(len(space.groups), 3, generator=torch.Generator().manual_seed(3),
                                              dtype=torch.float64), dim=-1)
    sums = {kind: [0.0, 0.0] for kind in ("flops", "params")}
    target = 0.3
    penalty = 0.0
    for choice in itertools.product(range(3), repeat=len(space.groups)):
        weight = float(torch.prod(probabilities[torch.arange(len(space.groups)), torch.tensor(choice)]))
        counts = cost.fraction(cost.exact(torch.tensor(choice)))
        for kind in sums:
            sums[kind][0] += weight * counts[kind]
            sums[kind][1] += weight * counts[kind] ** 2
        penalty += weight * (counts["flops"] / target - 1) ** 2
    moments = cost.moments(probabilities)
    for kind, (mean, second) in sums.items():
        assert float(moments[kind][0]) == pytest.approx(mean, rel=1e-12)
        assert float(moments[kind][1]) == pytest.approx(second, rel=1e-12)
    assert float(cost.expected_penalty(probabilities, "flops", target)["penalty"]) == pytest.approx(penalty, rel=1e-10)


@pytest.mark.parametrize("torchvision_space", ["resnet18"], indirect=True)
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_penalty_alone_drives_derived_student_to_target(torchvision_space, target):
    """Only the resource term, the search's default arch lr: the argmax student lands within 15%."""
    _, _, space, cost = torchvision_space
    gates = ChoiceGates(space)
    optimizer = torch.optim.Adam(gates.parameters(), lr=SearchConfig.arch_lr)
    # A penalty on E_p[cost] alone is met by near-uniform logits whose argmax is the widest student.
    spread = cost.expected_penalty(gates.probabilities(), "flops", target)
    assert cost.fraction(cost.exact(gates.argmax()))["flops"] == 1.0 and spread["penalty"] > 0.05
    for _ in range(80):
        loss = cost.expected_penalty(gates.probabilities(), "flops", target)["penalty"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    derived = cost.exact(gates.argmax())["flops"] / cost.base["flops"]
    assert abs(derived / target - 1) < 0.15, f"target {target}: derived {derived:.3f}"


def test_search_writes_arch_metrics_and_plot(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator))
               for _ in range(4)]
    config = SearchConfig(target_flops=0.4, max_steps_per_epoch=3, choices=(1, 2, 4), tau0=1.0,
                          train=search_training(epochs=1, image_size=8, round_to=4, device="cpu",
                                                out=str(tmp_path / "run")))
    result = search(config, model=TinyResidualNet(), train_loader=batches, num_classes=3)

    arch = read_arch(result.arch_path)
    assert arch == json.loads(json.dumps(result.arch))
    assert arch["target"] == {"flops": 0.4} and arch["choices"] == [1.0, 2.0, 4.0]
    assert arch["num_classes"] == 3 and arch["image_size"] == 8 and arch["round_to"] == 4
    alphas = {name: group["alpha"] for name, group in arch["groups"].items()}
    assert alphas == {name: config.choices[int(i)] for name, i in zip(arch["groups"], result.logits.argmax(-1))}
    # The policy rebuilds the same student: its profile is the recorded count.
    rebuilt = anfast.adjoin(TinyResidualNet(), alpha=1, policy=arch["policy"], round_to=4, input_size=(3, 8, 8))
    assert anfast.profile(anfast.export_student(rebuilt), (3, 8, 8)) == arch["student"]
    for name, group in arch["groups"].items():  # round_to 4: ceil(C / alpha) up to a multiple of 4, at most C
        expected = hand_student_width(group["channels"], group["alpha"], 4)
        assert group["width"] == expected, (name, group)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 3
    assert rows[0]["derived_flops"] == pytest.approx(arch["student"]["flops"] / arch["base"]["flops"])
    assert 0 < rows[0]["expected_flops"] < 1 and rows[0]["gate_entropy"] > 0
    assert rows[0]["penalty"] > 0 and result.logits.abs().sum() > 0  # the logits moved (no warm-up at 3 steps)
    assert result.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_derive_rejects_unknown_and_fixed_groups():
    with pytest.raises(DanError, match="not width groups"):
        derive(TinyResidualNet(), {"no_such_layer": 2}, image_size=8)
    with pytest.raises(DanError, match="cannot shrink"):
        derive(TinyResidualNet(), {"fc": 2}, image_size=8)


def test_cli_builds_the_config_and_validates_the_target():
    parser = argparse.ArgumentParser(prog="anfast")
    register(parser.add_subparsers())
    args = parser.parse_args(["search", "--target-params", "0.25", "--choices", "1,2,4", "--tau0", "2",
                              "--epochs", "3", "--max-steps-per-epoch", "10", "--frozen-noise", "--out", "r",
                              "--tau-schedule", "paper", "--arch-warmup", "0.5", "--optimizer", "sgd"])
    config = config_from_args(args)
    assert config.tau_schedule == "paper" and config.arch_warmup == 0.5 and config.train.optimizer == "sgd"
    assert config.target == {"params": 0.25} and config.choices == (1.0, 2.0, 4.0)
    assert config.tau0 == 2.0 and config.train.epochs == 3 and config.max_steps_per_epoch == 10 and config.frozen_noise
    assert args.func is not None
    with pytest.raises(SystemExit):
        parser.parse_args(["search"])  # a target is required
    with pytest.raises(DanError, match="below what choices"):
        SearchConfig(target_flops=0.01, choices=(1, 2, 4)).validate()
    with pytest.raises(DanError, match="exactly one target"):
        SearchConfig(target_flops=0.5, target_params=0.5).validate()
    with pytest.raises(DanError, match="arch_warmup"):
        SearchConfig(target_flops=0.5, arch_warmup=1.0).validate()
    for choices in ((), (1, 1), (0.5, 1)):  # () once crashed in max(); the others blamed the target
        with pytest.raises(DanError, match="give two or more distinct width divisors >= 1"):
            SearchConfig(target_flops=0.3, choices=choices).validate()


def test_read_arch_names_the_file_it_cannot_read(tmp_path):
    from anfast.dan import read_arch

    for name, content, message in (("list.json", b"[1, 2]", r"not an arch record \(format 'list'"),
                                   ("cut.json", b'{"a', "not JSON"), ("binary.json", b"\x80\x04", "not JSON")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DanError, match=rf"^{tmp_path / name}: {message}"):
            read_arch(tmp_path / name)


def test_search_errors_are_one_line_on_stderr(tmp_path, capsys):
    import anfast.cli

    assert anfast.cli.main(["search", "--target-flops", "0", "--out", str(tmp_path / "s")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("anfast search: error: target flops=0.0: give a fraction of the base")
    assert len(captured.err.strip().splitlines()) == 1


def test_the_search_report_says_when_the_derived_student_misses_its_target(tmp_path):
    """A search too short to pull the widths down derives the base itself: the report says
    the target was not reached (and how to reach it) instead of only listing both numbers."""
    from anfast.dan.search import _report

    def arch(student_flops, target):
        return {"arch": "resnet18", "image_size": 32, "round_to": 8, "target": target,
                "base": {"flops": 1000, "params": 400}, "student": {"flops": student_flops, "params": 100}}

    missed = _report(arch(1000, {"flops": 0.5}), tmp_path / "arch.json", tmp_path / "widths.png", None)
    assert ("note: the student's flops are 100.0% of the base's, the target 50.0%: the search did "
            "not reach it") in missed
    under = _report(arch(400, {"flops": 0.5}), tmp_path / "arch.json", tmp_path / "widths.png", None)
    assert "are 40.0% of the base's, the target 50.0%: it went below; weigh the cost less (--gamma)" in under
    for close in (arch(520, {"flops": 0.5}), arch(1000, {"params": 0.25})):  # 104% / exactly 25%
        assert "note:" not in _report(close, tmp_path / "arch.json", tmp_path / "widths.png", None)


def _run_with_soft_gates(model: nn.Module, layer: str, points: str, adjoined: bool = True):
    """One float64 forward of ``model``'s search network under random soft gates, with
    two choices of one width in ``layer``'s group (``points``: the SearchSpace attribute
    that maps it). Returns the space, the layer's student input and output (an adjoined
    layer's second ones; with ``adjoined`` False, a StudentReduction's only ones), its
    group's widths and gates, and every group's gates."""
    network = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4, 8), round_to=4)
    group = getattr(space, points)[layer]
    widths = space.widths[group].tolist()
    assert len(set(widths)) < len(widths), widths  # two choices of one width: their gates add up
    masks = StudentMasks(network, space)
    seen = {}
    network.get_submodule(layer).register_forward_hook(
        lambda module, args, out: seen.update(x=args[1], y=out[1]) if adjoined else seen.update(x=args[0], y=out))
    gates = torch.softmax(torch.randn(len(space.groups), len(space.choices), dtype=torch.float64), -1)
    masks.set_gates(gates)
    with torch.no_grad():
        network(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    return space, seen["x"], seen["y"], widths, gates[group].tolist(), gates


@pytest.mark.parametrize("norm", ["group norm", "layer norm on (N, H, W, C)"])
def test_soft_gates_mix_each_choices_norm_of_its_leading_channels(norm):
    """With soft gates, a norm over a searched group outputs sum_i g_i * norm_i, norm_i its
    norm of the leading width_i channels (zero beyond), choices of one width summed:
    against F.group_norm / F.layer_norm of each slice, by hand, in float64."""
    from test_adjoin import ChannelsLastBlock

    torch.manual_seed(0)
    model = GroupNormed() if norm == "group norm" else ChannelsLastBlock("none")
    with torch.no_grad():
        model.norm.weight.add_(torch.randn_like(model.norm.weight))
        model.norm.bias.add_(torch.randn_like(model.norm.bias))
    _, x, y, widths, gates, _ = _run_with_soft_gates(model, "norm", "norm_points")
    weight, bias = model.norm.weight.double(), model.norm.bias.double()
    expected = torch.zeros_like(y)
    for gate, width in zip(gates, widths):
        if norm == "group norm":
            expected[:, :width] += gate * F.group_norm(x[:, :width], 4, weight[:width], bias[:width], 1e-5)
        else:
            expected[..., :width] += gate * F.layer_norm(x[..., :width], (width,), weight[:width], bias[:width], 1e-6)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def _assert_mix_equals(norm: nn.Module, x: torch.Tensor, widths: tuple, tolerance: float, expected_of) -> None:
    """norm.mix_leading(x, widths, gates), random gates, against ``expected_of(x, gates,
    weight, bias)`` computed in float64 from the same values: the output and the
    gradients of x, the gates, weight and bias (those the norm has), for one random dy.
    The norm's parameters are drawn first (a norm starts at ones and zeros)."""
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn_like(parameter))
    x = x.requires_grad_()
    gates = torch.softmax(torch.randn(len(widths), dtype=torch.float64), 0).to(x.device, x.dtype).requires_grad_()
    inputs = [x, gates, *norm.parameters()]
    y = norm.mix_leading(x, widths, gates)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    reference = [t.detach().double().requires_grad_() for t in inputs]
    expected = expected_of(*reference + [None] * (4 - len(reference)))
    expected_grads = torch.autograd.grad(expected, reference, grad_y.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_rel(y, expected, tolerance, "output")
    for name, grad, expected_grad in zip(["x", "gates", "weight", "bias"], grads, expected_grads):
        assert_close_rel(grad, expected_grad, tolerance, f"d {name}")


def _leading(parameter, width):
    return None if parameter is None else parameter[:width]


ON_CUDA_TOO = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("channels, widths", [(16, (4, 8, 16)), (13, (3, 7, 12)), (24, (8, 16))],
                         ids=["blocks of 4", "blocks of 1, a tail no choice has", "no choice at full width"])
@pytest.mark.parametrize("affine", ["weight and bias", "weight", "none"])
@pytest.mark.parametrize("channels_axis", [-1, 1])
@ON_CUDA_TOO
def test_a_layer_norms_mixture_in_one_pass_equals_each_choices_norm_summed(device, channels_axis, affine, channels,
                                                                          widths, dtype, tolerance):
    """AdjoinedLayerNorm.mix_leading (a DAN search's mixed LayerNorm, one pass over the
    channels) against sum_k g_k * F.layer_norm of the leading widths[k] channels, zero
    padded. The input's mean is 30 standard deviations from zero, where E[x^2] - mean^2
    would lose the variance in float32."""
    torch.manual_seed(0)
    norm = anfast.nn.AdjoinedLayerNorm(channels, 1e-6, elementwise_affine=affine != "none",
                                       bias=affine == "weight and bias", channels_axis=channels_axis).to(device, dtype)
    shape = (3, 5, 7, channels) if channels_axis == -1 else (3, channels, 5, 7)
    x = (torch.randn(shape, dtype=torch.float64) + 30).to(device, dtype)

    def expected_of(x, gates, weight, bias):
        rows = x.movedim(channels_axis, -1)
        return sum(gate * F.pad(F.layer_norm(rows[..., :width], (width,), _leading(weight, width),
                                             _leading(bias, width), 1e-6), (0, channels - width))
                   for gate, width in zip(gates, widths)).movedim(-1, channels_axis)

    _assert_mix_equals(norm, x, widths, tolerance, expected_of)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
@pytest.mark.parametrize("groups, channels, widths", [(4, 16, (4, 8, 16)), (1, 13, (3, 7, 12)), (2, 24, (8, 16))],
                         ids=["4 groups, blocks of 1", "1 group, a tail no choice has", "2 groups of 4-channel blocks"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["(N, C, H, W)", "channels_last", "(N, C)"])
@ON_CUDA_TOO
def test_a_group_norms_mixture_in_one_pass_equals_each_choices_norm_summed(device, layout, affine, groups, channels,
                                                                          widths, dtype, tolerance):
    """AdjoinedGroupNorm.mix_leading against sum_k g_k * F.group_norm of the leading
    widths[k] channels in as many groups, zero padded, with the input's mean 30 standard
    deviations from zero (float32: the gates' gradient sums gw * (x - mean) as
    sum gw * x - mean * sum gw, losing about a digit and a half there)."""
    torch.manual_seed(0)
    norm = anfast.nn.AdjoinedGroupNorm(groups, channels, affine=affine).to(device, dtype)
    if layout == "(N, C)":  # groups of 1-6 values: far from zero they are nearly equal (see _MixedGroupNorm)
        if dtype == torch.float32 and widths[0] == groups:
            pytest.skip("a group of one value (its output is the bias): rstd = eps^-1/2 amplifies float32 rounding")
        x = torch.randn(5, channels, dtype=torch.float64)
    else:
        x = torch.randn(3, channels, 5, 7, dtype=torch.float64) + 30
    x = x.to(device, dtype, memory_format=torch.channels_last if layout == "channels_last" else torch.preserve_format)

    def expected_of(x, gates, weight, bias):
        return sum(gate * F.pad(F.group_norm(x[:, :width], groups, _leading(weight, width), _leading(bias, width),
                                             norm.eps), (0, 0) * (x.dim() - 2) + (0, channels - width))
                   for gate, width in zip(gates, widths))

    _assert_mix_equals(norm, x, widths, tolerance, expected_of)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("channels_axis", [-1, 1])
def test_a_grns_mixture_in_one_pass_equals_each_choices_grn_summed(channels_axis, dtype, tolerance):
    """AdjoinedGlobalResponseNorm.mix_leading against sum_k g_k * GRN_k by hand, GRN_k =
    x + bias + weight * x * n / (mean of n over the leading widths[k] channels + eps) on
    those channels, zero beyond (n: each channel's spatial L2 norm); 13 channels, a tail
    no choice has."""
    torch.manual_seed(0)
    channels, widths = 13, (3, 7, 12)
    norm = anfast.nn.AdjoinedGlobalResponseNorm(channels, channels_axis=channels_axis).to(dtype)
    shape = (2, 5, 4, channels) if channels_axis == -1 else (2, channels, 5, 4)

    def expected_of(x, gates, weight, bias):
        rows = x.movedim(channels_axis, -1)  # (N, H, W, C)
        n = rows.square().sum((1, 2), keepdim=True).sqrt()
        return sum(gate * F.pad(rows[..., :w] + bias[:w] + weight[:w] * rows[..., :w] * n[..., :w]
                                / (n[..., :w].mean(-1, keepdim=True) + norm.eps), (0, channels - w))
                   for gate, w in zip(gates, widths)).movedim(-1, channels_axis)

    _assert_mix_equals(norm, torch.randn(shape, dtype=torch.float64).to(dtype), widths, tolerance, expected_of)


@pytest.mark.parametrize("norm", ["layer norm on (N, H, W, C)", "layer norm on (N, C, H, W)", "group norm", "grn"])
def test_a_norms_mixture_may_be_modified_in_place(norm):
    """A mixture is a new tensor, not a view made inside the autograd function (which
    autograd forbids modifying in place): an in-place ReLU after it, as ResNet-GN's blocks
    have, gives the gradients of an out-of-place one."""
    torch.manual_seed(0)
    if norm == "group norm":
        module, shape = anfast.nn.AdjoinedGroupNorm(4, 16).double(), (2, 16, 3, 3)
    elif norm == "grn":
        module, shape = anfast.nn.AdjoinedGlobalResponseNorm(16).double(), (2, 3, 3, 16)
        torch.nn.init.normal_(module.weight)
    else:
        axis = -1 if "(N, H, W, C)" in norm else 1
        module = anfast.nn.AdjoinedLayerNorm(16, channels_axis=axis).double()
        shape = (2, 3, 3, 16) if axis == -1 else (2, 16, 3, 3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gates = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    expected = torch.autograd.grad(torch.relu(module.mix_leading(x, (4, 8, 16), gates)).sum(), x)[0]
    mixed = module.mix_leading(x, (4, 8, 16), gates)
    mixed.relu_()
    assert torch.equal(torch.autograd.grad(mixed.sum(), x)[0], expected)


def test_a_group_norms_mixture_refuses_widths_it_cannot_mix():
    norm = anfast.nn.AdjoinedGroupNorm(4, 16)
    with pytest.raises(ValueError, match=r"widths=\[6, 16\] must ascend, distinct, multiples of num_groups=4"):
        norm.mix_leading(torch.randn(2, 16, 3, 3), (6, 16), torch.full((2,), 0.5))


def test_a_layer_norms_mixture_refuses_widths_it_cannot_mix():
    norm = anfast.nn.AdjoinedLayerNorm(8)
    x, gates = torch.randn(2, 8), torch.full((2,), 0.5)
    for widths in [(4, 2), (4, 4), (0, 8), (4, 9)]:
        with pytest.raises(ValueError, match=r"mix_leading: widths=.* must ascend"):
            norm.mix_leading(x, widths, gates)
    with pytest.raises(ValueError, match=r"one gate each \(gates of shape \(3,\)\)"):
        norm.mix_leading(x, (4, 8), torch.full((3,), 0.5))


@pytest.mark.parametrize("affine", ["own", "shared", "none"])
@pytest.mark.parametrize("norm_class", [nn.BatchNorm2d, nn.BatchNorm1d])
def test_a_batch_norms_mask_scales_its_affine_and_equals_masking_its_output(norm_class, affine):
    """A searched batch norm computes bn(x) * m as one norm with weight * m and bias * m:
    against F.batch_norm times the mask in float64, in train mode, the output, the running
    statistics and the gradients of the input, the mask and the affine parameters, for the
    student's own affine parameters, the base's shared slice, and a norm without any."""
    torch.manual_seed(0)
    bn = norm_class(6, affine=affine != "none", dtype=torch.float64)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(6)), bn.bias.copy_(torch.randn(6))
    adjoined_class = anfast.nn.AdjoinedBatchNorm2d if norm_class is nn.BatchNorm2d else anfast.nn.AdjoinedBatchNorm1d
    layer = adjoined_class.from_batchnorm(bn, [6], share_affine=affine == "shared").train()
    student = layer.student_norms[0]
    params = [layer.weight, layer.bias] if affine == "shared" else [student.weight, student.bias] if bn.affine else []
    mask = torch.sigmoid(torch.randn(6, dtype=torch.float64)).requires_grad_()
    layer.student_mask = lambda module: mask
    shape = (4, 6, 3, 3) if norm_class is nn.BatchNorm2d else (4, 6)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(shape, dtype=torch.float64)
    running = (student.running_mean.clone(), student.running_var.clone())
    expected = F.batch_norm(x, *running, *(params or (None, None)), True, bn.momentum, bn.eps)
    expected = expected * mask.view((1, -1) + (1,) * (len(shape) - 2))
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, mask, *params])

    y = layer(torch.randn(shape, dtype=torch.float64), x)[1]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((student.running_mean, student.running_var), running, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((y * weights).sum(), [x, mask, *params])
    for name, got, want in zip(["x", "mask", "weight", "bias"], grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", ["(N, F)", "(N, H, W, C)", "input shared"])
def test_a_linears_mask_scales_its_weight_rows_and_equals_masking_its_output(case, bias):
    """A searched linear computes F.linear(x, w, b) * m as F.linear(x, w * m[:, None], b * m):
    against the product on the output in float64, the output and the gradients of the
    input, the mask and the parameters; on ConvNeXt's (N, H, W, C) features too, and for a
    linear on the image (its students slice the base's output, masked after)."""
    torch.manual_seed(0)
    shared = case == "input shared"
    layer = anfast.nn.AdjoinedLinear(8, 6, bias, student_in_features=(8,), student_out_features=(4,),
                                     input_shared=shared, dtype=torch.float64)
    mask = torch.sigmoid(torch.randn(4, dtype=torch.float64)).requires_grad_()
    layer.student_mask = lambda module: mask
    shape = (3, 5, 5, 8) if case == "(N, H, W, C)" else (3, 8)
    x_base, x = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    inputs = (x_base,) if shared else (x_base, x)
    read = x_base if shared else x  # what the student's output is computed from
    weights = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    params = [layer.weight] + ([layer.bias] if bias else [])
    expected = F.linear(read, layer.weight[:4], layer.bias[:4] if bias else None) * mask
    expected_grads = torch.autograd.grad((expected * weights).sum(), [read, mask, *params])

    y = layer(*inputs)[1]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((y * weights).sum(), [read, mask, *params])
    for name, got, want in zip(["x", "mask", "weight", "bias"], grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", ["plain", "depthwise", "same-padded", "standardised", "mixed filters", "input shared"])
def test_a_convs_mask_scales_its_filters_and_equals_masking_its_output(case, bias):
    """A searched conv computes conv(x, w, b) * m as conv(x, w * m, b * m): against the
    product on the output in float64, the output and the gradients of the input, the mask
    and the parameters; for a depthwise conv, TF's "SAME" padding, a ScaledStdConv2d
    (filters standardised over the student's slice, its gain), one whose filters a search
    mixes (``student_filters``), and a conv on the image (its student slices the base's
    output, masked after)."""
    torch.manual_seed(0)
    shared = case == "input shared"
    groups = 6 if case == "depthwise" else 1
    form = {"same-padded": {"pad_same": True}, "standardised": {"standardise_eps": 1e-5, "scale": 0.7},
            "mixed filters": {"standardise_eps": 1e-5}}.get(case, {})
    in_student = 6 if shared else 4 if groups > 1 else 5
    layer = anfast.nn.AdjoinedConv2d(6, 6, 3, 2, 0 if form.get("pad_same") else 1, groups=groups, bias=bias,
                                     student_in_channels=(in_student,), student_out_channels=(4,),
                                     input_shared=shared, dtype=torch.float64, **form)
    with torch.no_grad():
        if layer.scale is not None:
            layer.gain.copy_(torch.rand(6, 1, 1, 1) + 0.5)
    mixed = torch.randn(4, in_student, 3, 3, dtype=torch.float64, requires_grad=True)
    if case == "mixed filters":
        layer.student_filters = lambda module: mixed
    mask = torch.sigmoid(torch.randn(4, dtype=torch.float64)).requires_grad_()
    layer.student_mask = lambda module: mask
    x_base = torch.randn(3, 6, 9, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, in_student, 9, 8, dtype=torch.float64, requires_grad=True)
    inputs, read = ((x_base,), x_base) if shared else ((x_base, x), x)  # what the student reads
    # The student's own conv by hand: its filters and bias sliced (a depthwise conv keeps
    # its leading groups), standardised as timm's layer of its width, or the mixed ones.
    weight = layer.weight if shared else layer.weight[:4] if groups > 1 else layer.weight[:4, :in_student]
    if case == "standardised":
        weight = _standardised_by_hand(weight) * layer.gain[:4] * 0.7 * (6 * 9 / weight[0].numel()) ** 0.5
    elif case == "mixed filters":
        weight = mixed
    # "SAME" at stride 2 by hand: 9 rows give 5 outputs, one pixel each side; 8 columns
    # give 4, the odd pixel last.
    padded = F.pad(read, (0, 1, 1, 1)) if case == "same-padded" else read
    padding = 1 if shared or not form.get("pad_same") else 0
    expected = F.conv2d(padded, weight, layer.bias[:weight.shape[0]] if bias else None, 2, padding,
                        groups=4 if groups > 1 else 1)
    expected = expected[:, :4] * mask.view(-1, 1, 1)
    params = [layer.weight] + ([layer.bias] if bias else []) + ([layer.gain] if layer.scale else []) + (
        [mixed] if case == "mixed filters" else [])
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [read, mask, *params], allow_unused=True)

    y = layer(*inputs)[1]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((y * weights).sum(), [read, mask, *params], allow_unused=True)
    names = ["x", "mask", "weight"] + (["bias"] if bias else []) + (["gain"] if layer.scale else []) + (
        ["mixed filters"] if case == "mixed filters" else [])
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("gate, node, op", [
    ("CBAM spatial: mean and amax", "mean", lambda x: x.mean(1, keepdim=True)),
    ("CBAM spatial: mean and amax", "amax", lambda x: x.amax(1, keepdim=True)),
    ("softmin over the channels", "softmin", lambda x: F.softmin(x, 1)),
    ("CBAM spatial: max .values, mean(axis=1)", "max_1", lambda x: x.max(1, keepdim=True).values),
    ("StarReLU: scale * relu(y) ** 2 + bias", "add", lambda x: x + 0.75),
])
def test_soft_gates_mix_each_choices_reduction_of_its_leading_channels(gate, node, op):
    """With soft gates, an op over a searched group's channels (a StudentReduction) outputs
    sum_i g_i * op(x[:, :width_i]), choices of one width summed; a softmin's terms, which
    keep the channels, and a shift's, zero beyond each width; of torch.max's (values,
    indices), the values, and the widest choice's indices: by hand, in float64."""
    torch.manual_seed(0)
    _, x, y, widths, gates, _ = _run_with_soft_gates(GatedNet(gate), f"student_reductions.{node}",
                                                     "reduction_points", adjoined=False)
    if isinstance(y, tuple):
        assert torch.equal(y.indices, x.max(1, keepdim=True).indices)  # the widest choice is all of x
        y = y.values
    expected = torch.zeros_like(y)
    for weight, width in zip(gates, widths):
        term = op(x[:, :width])
        expected[:, :term.shape[1]] += weight * term
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def _standardised_by_hand(filters: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each filter to zero mean and unit variance over its inputs and taps (the biased
    variance, eps added), as weight standardisation defines it."""
    mean = filters.mean((1, 2, 3), keepdim=True)
    return (filters - mean) / torch.sqrt(filters.var((1, 2, 3), keepdim=True, unbiased=False) + eps)


def test_soft_gates_mix_each_choices_standardised_filters():
    """With soft gates, a weight-standardised conv's student convolves with sum_i g_i * S_i,
    S_i the filters standardised over the leading width_i input channels, times the gain
    and gamma / sqrt(fan-in) of that width (zero beyond), and then masked by its own
    group's gates: by hand, in float64."""
    timm = pytest.importorskip("timm")

    class Standardised(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = timm.layers.ScaledStdConv2d(16, 8, 3, gamma=1.7, eps=1e-5)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.a(torch.relu(self.stem(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model = Standardised()
    with torch.no_grad():
        model.a.gain.add_(torch.randn_like(model.a.gain))
    space, x, y, widths, gates, every_gate = _run_with_soft_gates(model, "a", "standardised_points")
    weight, gain = model.a.weight.double(), model.a.gain.double()
    mixed = torch.zeros_like(weight)
    for gate, width in zip(gates, widths):
        mixed[:, :width] += gate * _standardised_by_hand(weight[:, :width]) * gain * 1.7 / math.sqrt(width * 9)
    expected = F.conv2d(x, mixed, model.a.bias.double(), padding=model.a.padding)
    own_mask = space.channel_masks(every_gate)[space.group_names.index("a")]
    torch.testing.assert_close(y, expected * own_mask.view(-1, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["StdConv2d", "ScaledStdConv2d"])
@pytest.mark.parametrize("widths", [(2, 4, 8, 16), (3, 5, 16), (6,)], ids=["halvings", "uneven", "one"])
def test_a_standardised_convs_mixture_in_one_computation_equals_each_choices_filters_summed(widths, form):
    """mix_standardised(widths, gates) = sum_k g_k * S_k, S_k the filters standardised over
    their leading widths[k] input channels and taps (zero beyond), times the gain and gamma /
    sqrt(fan-in) of that width: against the formula by hand in float64 (mean and biased
    variance per filter), the output and the gradients of the weight, the gain and the
    gates (not summing to one: the mix is linear in them)."""
    torch.manual_seed(0)
    scaled = form == "ScaledStdConv2d"
    # timm's ScaledStdConv2d: scale = gamma / sqrt(fan-in), gamma 1.7
    layer = anfast.nn.AdjoinedConv2d(16, 8, 3, padding=1, standardise_eps=1e-5,
                                     scale=1.7 / math.sqrt(16 * 9) if scaled else None,
                                     student_in_channels=(16,), student_out_channels=(8,), dtype=torch.float64)
    with torch.no_grad():
        layer.weight.add_(0.3)  # filters whose mean is not zero
        if scaled:
            layer.gain.copy_(torch.rand(8, 1, 1, 1) + 0.5)
    gates = torch.rand(len(widths), dtype=torch.float64, requires_grad=True)
    params = [layer.weight, gates] + ([layer.gain] if scaled else [])
    expected = torch.zeros_like(layer.weight)
    for k, width in enumerate(widths):
        factor = layer.gain * 1.7 / math.sqrt(width * 9) if scaled else 1.0
        expected = expected + F.pad(gates[k] * _standardised_by_hand(layer.weight[:, :width]) * factor,
                                    (0, 0, 0, 0, 0, 16 - width))
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)

    mixed = layer.mix_standardised(widths, gates)
    torch.testing.assert_close(mixed, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((mixed * weights).sum(), params)
    for name, got, want in zip(["weight", "gates", "gain"], grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


def test_a_standardised_convs_mixture_refuses_widths_it_cannot_mix():
    layer = anfast.nn.AdjoinedConv2d(8, 4, 3, standardise_eps=1e-5, student_in_channels=(8,),
                                     student_out_channels=(4,))
    for widths in [(4, 2), (4, 4), (0, 8), (4, 9)]:
        with pytest.raises(ValueError, match=r"mix_standardised: widths=.* must ascend"):
            layer.mix_standardised(widths, torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"one gate each \(gates of shape \(3,\)\)"):
        layer.mix_standardised((4, 8), torch.full((3,), 0.5))
    plain = anfast.nn.AdjoinedConv2d(8, 4, 3, student_in_channels=(8,), student_out_channels=(4,))
    with pytest.raises(ValueError, match=r"needs a weight-standardised conv with groups=1"):
        plain.mix_standardised((4, 8), torch.full((2,), 0.5))


class InPlaceNet(nn.Module):
    """VGG without norms: an in-place ReLU right after the stem conv (whose students slice
    the base's output) and after the next conv, then a linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.act1, self.act2, self.fc = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv(self.act1(self.stem(x)))).mean((2, 3)))


def test_a_search_step_backs_through_in_place_relus_after_masked_convs():
    """A search step of a network with in-place ReLUs after its masked convs (VGG-11,
    SqueezeNet) runs backward, and the student's output and every gradient, the gates'
    included, equal the masked student computed by hand in float64: relu(conv(x) * m)
    per conv, each mask the gates' sum over the choices wider than the channel."""
    torch.manual_seed(0)
    network = anfast.adjoin(InPlaceNet().double(), alpha=1, policy="all", input_size=(3, 8, 8))
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert sorted(space.mask_points) == ["conv", "stem"]
    masks = StudentMasks(network, space)
    logits = torch.randn(len(space.groups), 3, dtype=torch.float64, requires_grad=True)
    images, labels = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    params = [network.stem.weight, network.stem.bias, network.conv.weight, network.conv.bias, network.fc.weight]

    def mask(layer, gates):  # by hand: channel c keeps the gates of the widths beyond it
        g = space.mask_points[layer]
        widths = space.widths[g]
        return torch.stack([gates[g][widths > c].sum() for c in range(16)])

    gates = torch.softmax(logits, -1)
    hidden = F.conv2d(images, network.stem.weight, network.stem.bias, padding=1)
    hidden = torch.relu(hidden * mask("stem", gates)[:, None, None])
    hidden = F.conv2d(hidden, network.conv.weight, network.conv.bias, padding=1)
    hidden = torch.relu(hidden * mask("conv", gates)[:, None, None])
    expected = F.linear(hidden.mean((2, 3)), network.fc.weight, network.fc.bias)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, labels), [logits, *params])

    masks.set_gates(torch.softmax(logits, -1))
    student = network(images).student
    torch.testing.assert_close(student, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(F.cross_entropy(student, labels), [logits, *params])
    for name, got, want in zip(["gates' logits", "stem weight", "stem bias", "conv weight", "conv bias", "fc weight"],
                               grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d {name}: {m}")


def test_a_copy_of_the_search_network_normalises_and_standardises_with_its_own_weights():
    """A norm's and a standardised conv's search computation is called with the layer, so a
    deep copy (an averaged model, a probe) runs on its own parameters: changing the copy's
    changes its student alone, and removing the masks gives the layers their own again."""
    timm = pytest.importorskip("timm")

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
            self.a, self.fc = timm.layers.ScaledStdConv2d(16, 8, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.a(torch.relu(self.norm(self.stem(x))))).mean((2, 3)))

    torch.manual_seed(0)
    network = anfast.adjoin(Both(), alpha=1, policy="all", input_size=(3, 8, 8)).double().eval()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert set(space.norm_points) == {"norm"} and set(space.standardised_points) == {"a"}
    masks = StudentMasks(network, space)
    masks.set_gates(torch.softmax(torch.randn(len(space.groups), 3, dtype=torch.float64), -1))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = network(x).student
        for layer in ("norm", "a"):
            twin = copy.deepcopy(network)
            assert torch.equal(twin(x).student, before)
            getattr(twin, layer).weight.mul_(1.5).add_(0.1)
            assert not torch.allclose(twin(x).student, before) and torch.equal(network(x).student, before)
        masks.remove()
        assert network.norm.student_norm is None and network.a.student_filters is None
        unmasked = network(x)
    torch.testing.assert_close(unmasked.student, unmasked.base, rtol=1e-12, atol=1e-12)  # full width: the base


def test_channel_masks_are_three_ops_however_many_groups():
    """DenseNet-121 has 120 searched groups: its masks, against each group's
    gates[g] @ 1[c < widths[g]] by hand, take one gather, one fill and one sum (views of
    one tensor after that), not a few ops per group each step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    network = anfast.adjoin("densenet121", alpha=1, policy="all", input_size=(3, 32, 32), num_classes=10)
    space = SearchSpace.from_network(network)
    assert len(space.groups) > 100
    gates = torch.softmax(torch.randn(len(space.groups), len(space.choices), dtype=torch.float64), -1)
    with Count() as count:
        masks = space.channel_masks(gates)
    for g, group in enumerate(space.groups):
        keep = (torch.arange(group.channels)[None, :] < space.widths[g][:, None]).double()
        torch.testing.assert_close(masks[g], gates[g] @ keep, rtol=1e-15, atol=0)
    computing = [op for op in count.ops if op not in ("split", "split_with_sizes", "detach", "_to_copy")]
    assert len(computing) == 3, count.ops
