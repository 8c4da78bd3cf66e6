"""anfast.models: the paper's XResNet counted by hand, timm models adjoined and exported, names resolved."""

import json
import re
import sys

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import anfast
from anfast.adjoin import AdjoinError
from anfast.cli.info import describe
from anfast.models import MissingExtraError, create_model, fetching_kwargs, xresnet18, xresnet50

from helpers import TOLERANCE, assert_close_rel, draw_zero_parameters

timm = pytest.importorskip("timm")


def _xresnet50_student_by_hand(image_size: int) -> tuple[int, int]:
    """(parameters without fc, multiply-adds) of the XResNet-50 student, alpha 4, paper policy.

    The paper's rule shrinks convs whose in and out channels both exceed 64: the stem and
    layer1 stay full; in layers 2-4 every conv (and the residual stream) is a quarter wide.
    Each conv costs c_in * c_out * k^2 weights and that times H_out * W_out multiply-adds;
    each BatchNorm 2 * c parameters and no multiply-adds in torch's counter.
    """
    params = macs = 0

    def conv(c_in, c_out, k, size):
        nonlocal params, macs
        params += c_in * c_out * k * k + 2 * c_out  # weights + its BatchNorm
        macs += c_in * c_out * k * k * size * size

    size = -(-image_size // 2)  # stem: 3x3 stride 2 then two 3x3, all full width
    conv(3, 32, 3, size), conv(32, 64, 3, size), conv(64, 64, 3, size)
    size = -(-size // 2)  # max pool
    # layer1, full width: 3 bottlenecks of 64 -> 64 -> 256, the first with a 1x1 shortcut.
    conv(64, 64, 1, size), conv(64, 64, 3, size), conv(64, 256, 1, size), conv(64, 256, 1, size)
    for _ in range(2):
        conv(256, 64, 1, size), conv(64, 64, 3, size), conv(64, 256, 1, size)
    # layers 2-4 at a quarter width; block 0 reads the previous stage's output (full width
    # after layer1), strides in its 3x3 and average-pools before its 1x1 shortcut.
    previous = 256
    for planes, blocks in ((128 // 4, 4), (256 // 4, 6), (512 // 4, 3)):
        conv(previous, planes, 1, size)
        size = -(-size // 2)
        conv(planes, planes, 3, size), conv(planes, 4 * planes, 1, size), conv(previous, 4 * planes, 1, size)
        for _ in range(blocks - 1):
            conv(4 * planes, planes, 1, size), conv(planes, planes, 3, size), conv(planes, 4 * planes, 1, size)
        previous = 4 * planes
    macs += previous * 1000  # the classifier reads 512 of the base's 2048 features
    return params, macs


def test_xresnet50_paper_student_counts_match_the_hand_count():
    params, macs = _xresnet50_student_by_hand(224)
    assert (params, macs) == (1_767_584, 1_617_784_832)
    text = describe("xresnet50", 4, "paper", 8, 1000, 224)
    row = re.search(r"^student \(alpha 4\)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    assert int(row[2].replace(",", "")) == params
    assert row[4] == f"{macs / 1e9:.3f}"
    # The paper's figures (1.8M, 1.6 GFLOPs that are multiply-adds) within 5%, as printed.
    ratios = re.search(r"^student / paper\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    assert abs(float(ratios[1]) - 1) <= 0.05 and abs(float(ratios[2]) - 1) <= 0.05, ratios[0]


def test_xresnet_is_the_papers_network():
    model = xresnet50(num_classes=7)
    assert [m.out_channels for m in model.conv1 if isinstance(m, nn.Conv2d)] == [32, 64, 64]
    assert model.conv1[0].stride == (2, 2) and model.conv1[0].kernel_size == (3, 3)
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], nn.AvgPool2d) and shortcut[0].ceil_mode and shortcut[1].stride == (1, 1)
    assert not isinstance(model.layer1[0].downsample[0], nn.AvgPool2d)  # stride 1: conv + BN only
    assert all(int(torch.count_nonzero(block.bn3.weight)) == 0 for layer in (model.layer1, model.layer4) for block in layer)
    assert torch.equal(model.layer1[0].bn2.weight.detach(), torch.ones(64))
    # Odd sizes: ceil_mode keeps the shortcut's and the strided conv's shapes equal.
    assert model.eval()(torch.randn(2, 3, 45, 45)).shape == (2, 7)
    small = xresnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 33, 33)
    assert torch.equal(torch.fx.symbolic_trace(small)(x), small(x))


def test_xresnet_student_exports_and_loads_by_name(tmp_path):
    torch.manual_seed(0)
    an = anfast.adjoin("xresnet18", alpha=4, policy="all", num_classes=5, input_size=(3, 32, 32))
    an(torch.randn(4, 3, 32, 32))  # train mode: move the running statistics off their init
    an.eval()
    for parameter in an.parameters():  # zero-initialised BNs would hide a wrong residual path
        parameter.data.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = an(x)
        anfast.export_student(an, path=tmp_path)
        loaded = anfast.load_student(tmp_path)
        assert type(loaded) is anfast.models.XResNet
        assert_close_rel(loaded(x), out.student, TOLERANCE[torch.float32], "xresnet18 student")
    assert json.loads((tmp_path / "config.json").read_text())["source"] == {"anfast": "xresnet18",
                                                                            "kwargs": {"num_classes": 5}}


# ResNet-18-D with CBAM in every block: a gate of the mean and max over the channels.
# CS3DarkNet splits its channels in halves, GhostNet keeps x[:, :k] of a concat and calls
# F.dropout(training=self.training) in its head, MixNet gates its mixed convs' concat;
# ECA-ResNet slides a Conv1d along each block's pooled channels, GC-ResNeXt pools space by
# a matmul with an attention map. ConvNeXt's blocks run
# LayerNorm and Linear layers on (N, H, W, C) and scale by a gamma (which keeps its
# channels full); ConvNeXt-V2 has no gamma, 1x1 convs, LayerNorm2d and a GRN. MobileViT's
# blocks, which timm keeps whole, hold batch norms: each student keeps its own statistics.
TIMM_MODELS = [("resnet18d", {"block_args": {"attn_layer": "cbam"}}), ("resnet50d", {"drop_path_rate": 0.1}),
               ("efficientnet_b0", {"drop_path_rate": 0.2}), ("mobilenetv3_large_100", {}),
               ("regnety_016", {}), ("cs3darknet_s", {}), ("ghostnet_100", {}), ("mixnet_s", {}),
               ("ecaresnet26t", {}), ("gcresnext26ts", {}), ("convnext_atto", {"conv_mlp": False}),
               ("convnextv2_atto", {}), ("mobilevit_xxs", {})]


@pytest.mark.parametrize("name, kwargs", TIMM_MODELS,
                         ids=[name + "-cbam" * ("block_args" in kwargs) for name, kwargs in TIMM_MODELS])
def test_timm_model_adjoins_and_exports_exactly(name, kwargs):
    """Base = the timm model; exported students = the adjoined students (eval, float32)."""
    torch.manual_seed(0)
    model = draw_zero_parameters(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    an = anfast.adjoin(model, alpha=(2, 4), policy="all", input_size=(3, 32, 32))
    an(torch.randn(4, 3, 32, 32))  # training step with stochastic depth on: moves running stats
    an.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = an(x)
        # The adjoined model was traced in train mode; eval must still switch DropPath off.
        assert torch.equal(an(x).base, out.base)
        base = anfast.export_base(an).eval()
        assert type(base) is type(model)
        model.load_state_dict(base.state_dict())
        assert_close_rel(out.base, model.eval()(x), TOLERANCE[torch.float32], f"{name} base")
        for index in range(2):
            student = anfast.export_student(an, index).eval()
            assert type(student) is type(model)
            # timm's norm-act layers keep their class (and so their activation) in the export.
            assert ([type(m) for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
                    == [type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
            assert anfast.count_parameters(student) < anfast.count_parameters(model)
            assert_close_rel(student(x), out.students[index], TOLERANCE[torch.float32], f"{name} student {index}")


# timm's convs with a forward of their own: (class, stride, input size). A stride-2 "SAME"
# conv on an odd size pads unevenly at run time; NFNets standardise their filters.
TIMM_CONVS = [("Conv2dSame", 2, 9), ("StdConv2d", 1, 8), ("StdConv2dSame", 2, 9), ("ScaledStdConv2d", 1, 8),
              ("ScaledStdConv2dSame", 2, 8)]


@pytest.mark.parametrize("name, stride, size", TIMM_CONVS, ids=[c[0] for c in TIMM_CONVS])
def test_timm_convs_adjoin_as_timm_computes_them_at_each_width(name, stride, size):
    """AdjoinedConv2d.from_conv(timm layer): the base is the layer; the student is timm's
    own layer built at the student's width (its own fan-in, so its own scale) holding the
    leading slice of the weights; the gradients of weight, gain and bias are the two
    layers' summed (float64)."""
    torch.manual_seed(0)
    cls = getattr(timm.layers, name)
    kwargs = {"bias": True} if "Std" in name else {}
    layer = cls(8, 16, 3, stride=stride, **kwargs).double()
    student = cls(4, 12, 3, stride=stride, **kwargs).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(torch.randn_like(parameter))  # gains off their 1, biases off 0
        for key, parameter in student.named_parameters():
            parameter.copy_(getattr(layer, key)[:12, :4] if key == "weight" else getattr(layer, key)[:12])
    adjoined = anfast.nn.AdjoinedConv2d.from_conv(layer, student_in_channels=(4,), student_out_channels=(12,))
    assert adjoined.gain is layer.gain if hasattr(layer, "gain") else not hasattr(adjoined, "gain")
    x = torch.randn(2, 8, size, size, dtype=torch.float64)
    y_base, y_student = adjoined(x, x[:, :4])
    expected_base, expected_student = layer(x), student(x[:, :4])
    assert y_base.shape == expected_base.shape and y_student.shape == expected_student.shape
    assert_close_rel(y_base, expected_base, 1e-14, f"{name} base")
    assert_close_rel(y_student, expected_student, 1e-12, f"{name} student")

    weights = torch.randn_like(expected_base), torch.randn_like(expected_student)
    ((y_base * weights[0]).sum() + (y_student * weights[1]).sum()).backward()
    adjoined_grads = {key: p.grad.clone() for key, p in layer.named_parameters()}
    layer.zero_grad()
    ((layer(x) * weights[0]).sum() + (student(x[:, :4]) * weights[1]).sum()).backward()
    for key, parameter in layer.named_parameters():
        expected = parameter.grad.clone()
        student_grad = getattr(student, key).grad
        if key == "weight":
            expected[:12, :4] += student_grad
        else:
            expected[:12] += student_grad
        assert_close_rel(adjoined_grads[key], expected, 1e-12, f"{name} d{key}")


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_timm_grn_adjoins_as_timm_computes_it_at_each_width(channels_last):
    """AdjoinedGlobalResponseNorm.from_grn(timm's GRN): the base is the layer; the student is
    timm's GRN built at the student's width holding the leading slice of weight and bias
    (its channel mean over its own channels); the gradients of weight and bias are the
    two layers' summed (float64)."""
    from timm.layers.grn import GlobalResponseNorm

    torch.manual_seed(0)
    layer = GlobalResponseNorm(12, channels_last=channels_last).double()
    student = GlobalResponseNorm(8, channels_last=channels_last).double()
    with torch.no_grad():
        for key, parameter in layer.named_parameters():
            parameter.normal_()  # timm starts both at zero: the identity
            getattr(student, key).copy_(parameter[:8])
    adjoined = anfast.nn.AdjoinedGlobalResponseNorm.from_grn(layer, student_channels=(8,))
    assert adjoined.weight is layer.weight and adjoined.bias is layer.bias
    axis = -1 if channels_last else 1
    x = torch.randn((2, 5, 6, 12) if channels_last else (2, 12, 5, 6), dtype=torch.float64)
    x_student = x.narrow(axis, 0, 8)
    y_base, y_student = adjoined(x, x_student)
    assert_close_rel(y_base, layer(x), 1e-12, "base")
    assert_close_rel(y_student, student(x_student), 1e-12, "student")
    weights = [torch.randn_like(y) for y in (y_base, y_student)]
    adjoined_grads = dict(zip(("weight", "bias"), torch.autograd.grad(
        (y_base * weights[0]).sum() + (y_student * weights[1]).sum(), (adjoined.weight, adjoined.bias))))
    layer.zero_grad()
    ((layer(x) * weights[0]).sum() + (student(x_student) * weights[1]).sum()).backward()
    for key, parameter in layer.named_parameters():
        expected = parameter.grad.clone()
        expected[:8] += getattr(student, key).grad
        assert_close_rel(adjoined_grads[key], expected, 1e-12, f"d{key}")


def _tiny_nfnet() -> nn.Module:
    """A normaliser-free network of timm's layers: a stride-2 "SAME" stem that pads at run
    time, an in-place activation on the stem's output (which the students share), a
    NormFreeBlock (grouped convs, a skip-init gain written in place) and a StdConv2d."""
    from timm.models.nfnet import NormFreeBlock

    return nn.Sequential(
        timm.layers.ScaledStdConv2dSame(3, 16, 3, stride=2), nn.SiLU(inplace=True),
        NormFreeBlock(16, 32, stride=2, alpha=0.2, bottle_ratio=1.0, group_size=8, skipinit=True, act_layer=nn.SiLU),
        timm.layers.StdConv2d(32, 24, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )


def test_a_normaliser_free_network_adjoins_and_its_student_round_trips(tmp_path):
    """Base = the model, exported and reloaded student = the adjoined one (float64); the
    student's ScaledStdConv2d layers scale by their own fan-in, as timm's layers of their
    width do, and its gains are the leading slice of the base's."""
    torch.manual_seed(0)
    model = _tiny_nfnet().double()
    with torch.no_grad():
        for parameter in model.parameters():  # the skip-init gain starts at 0: it would hide the block
            parameter.add_(torch.randn_like(parameter) * 0.1)
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 17, 17)).eval()
    assert an.layer_widths["2.conv1"].student_in == (8,)  # the block was traced into, not run whole
    x = torch.randn(2, 3, 17, 17, dtype=torch.float64)
    with torch.no_grad():
        out = an(x)
        assert_close_rel(out.base, model.eval()(x), 1e-14, "base")
        student = anfast.export_student(an, path=tmp_path)
        assert_close_rel(student(x), out.student, 1e-14, "exported student")
        loaded = anfast.load_student(tmp_path, model=_tiny_nfnet())
        assert_close_rel(loaded.double()(x), out.student, 1e-14, "loaded student")
    for network in (student, loaded):
        conv = network[2].conv1
        assert type(conv) is timm.layers.ScaledStdConv2d and conv.weight.shape == (8, 8, 1, 1)
        assert conv.scale == pytest.approx(timm.layers.ScaledStdConv2d(8, 8, 1).scale, rel=1e-15)
        assert torch.equal(conv.gain.detach(), model[2].conv1.gain.detach()[:8])
    assert anfast.count_parameters(student) < anfast.count_parameters(model)


def test_timm_group_norms_adjoin_and_the_student_keeps_their_classes(tmp_path):
    """BiT's pattern, StdConv2d then GroupNormAct, and PoolFormer's GroupNorm1: base = the
    model, exported and reloaded student = the adjoined one (float64); the student's norms
    are timm's classes with the model's number of groups over the student's channels."""
    def bit_like():
        return nn.Sequential(
            timm.layers.StdConv2d(3, 32, 3), timm.layers.GroupNormAct(32, num_groups=8, act_layer=nn.ReLU),
            nn.Conv2d(32, 16, 1), timm.layers.GroupNorm1(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
        )

    torch.manual_seed(0)
    model = bit_like().double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    an = anfast.adjoin(model, alpha=4, policy="all", input_size=(3, 9, 9)).eval()
    assert [an.layer_widths[name].student_out for name in ("1", "3")] == [(8,), (8,)]
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        out = an(x)
        assert_close_rel(out.base, model.eval()(x), 1e-14, "base")
        student = anfast.export_student(an, path=tmp_path)
        loaded = anfast.load_student(tmp_path, model=bit_like()).double()
        for network in (student, loaded):
            assert_close_rel(network(x), out.student, 1e-14, "student")
            assert type(network[1]) is timm.layers.GroupNormAct and type(network[3]) is timm.layers.GroupNorm1
            assert (network[1].num_groups, network[1].num_channels, network[3].num_groups) == (8, 8, 1)


def test_timm_student_round_trip_by_name(tmp_path):
    torch.manual_seed(0)
    an = anfast.adjoin("timm:mobilenetv3_large_100", alpha=4, policy="all", num_classes=6,
                       input_size=(3, 32, 32))
    an(torch.randn(4, 3, 32, 32))
    an.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        anfast.export_student(an, path=tmp_path)
        loaded = anfast.load_student(tmp_path)
        assert type(loaded) is timm.models.MobileNetV3
        assert_close_rel(loaded(x), an(x).student, TOLERANCE[torch.float32], "loaded timm student")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["source"] == {"timm": "mobilenetv3_large_100", "kwargs": {"num_classes": 6}}


def test_a_convnext_student_round_trips_by_name_with_its_sliced_layer_scales(tmp_path):
    """timm's ConvNeXt: the student's LayerNorms and gammas are narrower than the class
    builds them; load_student rebuilds it by name on the meta device, resizes both from
    config.json, checks them against the weight file and loads."""
    torch.manual_seed(0)
    an = anfast.adjoin("timm:convnext_atto", alpha=2, policy="all", num_classes=6, conv_mlp=False,
                       input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        anfast.export_student(an, path=tmp_path)
        loaded = anfast.load_student(tmp_path)
        assert type(loaded) is timm.models.ConvNeXt and loaded.stages[0].blocks[0].gamma.shape == (24,)
        assert_close_rel(loaded(x), an(x).student, TOLERANCE[torch.float32], "loaded ConvNeXt student")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tensors"]["stages.3.blocks.1.gamma"] == [160]
    assert config["layers"]["stages.0.blocks.0.norm"]["normalized_shape"] == [24]
    config["tensors"]["stages.3.blocks.1.gamma"] = [161]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(anfast.export.ExportError, match=r"stages.3.blocks.1.gamma: the network config.json "
                                                        r"describes has \[161\], the file holds \[160\]"):
        anfast.load_student(tmp_path)


def test_stochastic_depth_is_not_mistaken_for_a_weight_download(tmp_path):
    # drop_path_rate contains "path": the export check once refused it as a weight source.
    an = anfast.adjoin("timm:resnet18d", alpha=2, num_classes=3, drop_path_rate=0.1,
                       input_size=(3, 32, 32)).eval()
    anfast.export_student(an, path=tmp_path)
    loaded = anfast.load_student(tmp_path)
    assert type(loaded) is timm.models.ResNet
    assert json.loads((tmp_path / "config.json").read_text())["source"]["kwargs"]["drop_path_rate"] == 0.1
    assert fetching_kwargs(["drop_path_rate", "checkpoint_path", "weights", "weights_backbone", "cache_dir",
                            "pretrained_cfg_overlay", "path", "num_classes", "url"]) == [
        "cache_dir", "checkpoint_path", "path", "pretrained_cfg_overlay", "url", "weights", "weights_backbone"]


def test_missing_timm_names_the_extra(tmp_path, monkeypatch):
    an = anfast.adjoin("timm:resnet18d", alpha=2, num_classes=3, input_size=(3, 32, 32)).eval()
    anfast.export_student(an, path=tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"'timm:resnet18d' needs timm.*pip install 'anfast\[timm\]'"):
        anfast.adjoin("timm:resnet18d")
    with pytest.raises(MissingExtraError, match=r"anfast\[timm\]"):
        anfast.load_student(tmp_path)
    from anfast.train.build import create_adjoined_model
    from anfast.train.config import TrainConfig

    with pytest.raises(ImportError, match=r"anfast\[timm\]"):
        create_adjoined_model(TrainConfig(arch="timm:resnet18d"), 3)
    assert anfast.adjoin("xresnet18", alpha=2, num_classes=3, input_size=(3, 32, 32)).num_students == 1


def test_info_command_on_a_timm_model(capsys, monkeypatch):
    from anfast.cli import main

    assert main(["info", "--arch", "timm:resnet18d", "--alpha", "2,4", "--num-classes", "10",
                 "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^student \(alpha 4\)\s+[\d,]+", out, re.M) and "layer1.0.conv1" in out
    assert "paper (XResNet-50)" not in out  # the paper's figures are for ResNet-50s at 224 px, alpha 4
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["info", "--arch", "timm:resnet18d"]) == 2
    assert "pip install 'anfast[timm]'" in capsys.readouterr().err


def test_info_says_which_groups_keep_full_width_and_why():
    """CS3DarkNet splits each stage's expanded channels in halves and runs its blocks on
    the first: the split map and the blocks' residual stream are listed with the reason,
    and exactly their layers keep full width."""
    text = describe("timm:cs3darknet_s", 2, "all", 8, 10, 32)
    kept = dict(re.findall(r"^  (\S+)\s+\d+  (.+)$", text.split("and why:\n")[1], re.M))
    assert kept["stages.0.conv_exp.conv"] == "channels that split (call_method split) slices"
    assert kept["stages.0.blocks.0.conv2.conv"] == "output of the channel slice split (call_method split)[0]"
    rows = re.findall(r"^(\S+)\s+(conv|norm|linear)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)$", text, re.M)
    full = {group for _, _, _, out, _, student_out, group in rows if out == student_out}
    assert set(kept) == full - {"head.fc"}  # the classifier keeps every class: not listed
    assert "Kept at full width" not in describe("resnet18", 2, "all", 8, 10, 32)


def test_info_columns_fit_a_long_classifier_name():
    """torchvision's ConvNeXt names its classifier classifier.2: the column of parameters
    without it widens to its header, so each count ends under it."""
    lines = describe("convnext_tiny", 4, "all", 8, 10, 32).splitlines()
    header = next(line for line in lines if line.startswith("network"))
    end = header.index("classifier.2") + len("classifier.2")
    for label in ("base", "student (alpha 4)"):
        row = next(line for line in lines if line.startswith(label))
        assert row[end - 1].isdigit() and row[end] == " ", (header, row)
    assert re.search(r"\bparams +params w/o classifier\.2 ", header), header


def test_names_and_refusals():
    with pytest.raises(ValueError, match=r"'resnet50x' is not a timm model; did you mean \[.*'resnet50d'"):
        create_model("timm:resnet50x")
    with pytest.raises(ValueError, match=r"'xresnet5' is not a torchvision model; did you mean \[.*'xresnet50'"):
        create_model("xresnet5")
    with pytest.raises(ValueError, match=r"\['pretrained'\] would load weights"):
        create_model("timm:resnet18d", pretrained=True)
    # A Conv2d subclass with a forward anfast does not know (timm's it does): refused by name.
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(AdjoinError, match=r"0: Doubled subclasses Conv2d with its own forward.*timm's Conv2dSame, "
                                          r"StdConv2d, ScaledStdConv2d"):
        anfast.adjoin(model, input_size=(3, 9, 9))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.PReLU), nn.Conv2d(8, 4, 1))
    with pytest.raises(AdjoinError, match=r"1.act: PReLU has parameters"):
        anfast.adjoin(model, input_size=(3, 9, 9))


@pytest.mark.parametrize("arch, kwargs, message", [
    # anfast's own builders are annotated as strings (from __future__ import annotations).
    ("xresnet18", {"num_clases": 5}, r"anfast model 'xresnet18' takes no keyword argument 'num_clases' "
                                     r"\(did you mean \['num_classes'"),
    ("xresnet18", {"in_channels": "3"}, r"in_channels='3' \(str\), but in_channels takes int \(default 3\)"),
    # What the builder passes itself: one line naming it, not "got multiple values".
    ("resnet18", {"layers": [1, 1, 1, 1]}, r"torchvision model 'resnet18' sets layers itself"),
    ("xresnet50", {"block": "BasicBlock"}, r"anfast model 'xresnet50' sets block itself"),
])
def test_keyword_arguments_are_checked_for_every_library(arch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(arch, **kwargs)


def test_a_class_argument_the_builder_takes_over_its_own_default_builds():
    """timm merges the user's arguments over its builder's; torchvision's EfficientNet
    builders pop dropout from theirs: both are the user's to set."""
    with torch.device("meta"):
        assert len(create_model("timm:resnet18d", layers=[1, 1, 1, 1])[0].layer1) == 1
        assert create_model("efficientnet_b0", dropout=0.3)[0].classifier[0].p == 0.3


def test_a_list_parameter_takes_a_tuple():
    """As torchvision does for replace_stride_with_dilation (annotated List[bool])."""
    with torch.device("meta"):
        model = create_model("resnet50", replace_stride_with_dilation=(False, True, True))[0]
    assert [model.layer3[1].conv2.dilation, model.layer4[1].conv2.dilation] == [(2, 2), (4, 4)]


def _info_error(capsys, *argv) -> str:
    from anfast.cli import main

    assert main(["info", *argv]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    # Every command's errors come from anfast.cli.main's one printer, with the same hint.
    hint = " (--debug shows the traceback)"
    assert captured.err.strip().endswith(hint), captured.err
    return captured.err.strip().removesuffix(hint)


def test_info_refuses_a_model_larger_than_the_memory_before_allocating(capsys, monkeypatch):
    from anfast.models import registry

    # 100,000,000 classes x 2,048 features: 763 GiB of float32 classifier.
    error = _info_error(capsys, "--num-classes", "100000000")
    assert re.fullmatch(r"anfast info: error: model='resnet50': resnet50 with num_classes=100000000 holds "
                        r"204,923,561,205 parameters and buffers, 763.4 GiB, more than the [\d,.]+ GiB of "
                        r"memory available; choose smaller sizes", error), error
    # The bound is the memory available, whatever the machine: 10 MiB refuses a resnet18.
    monkeypatch.setattr(registry, "available_memory", lambda: 10 * 2**20)
    tensors = [*torchvision.models.resnet18(num_classes=10).state_dict().values()]
    count, size = sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)
    assert _info_error(capsys, "--arch", "resnet18", "--num-classes", "10") == (
        f"anfast info: error: model='resnet18': resnet18 with num_classes=10 holds {count:,} parameters and "
        f"buffers, {size / 2**20:.1f} MiB, more than the 10.0 MiB of memory available; choose smaller sizes")


def test_info_refuses_a_model_it_cannot_trace_in_one_line(capsys):
    """One line naming the model, the input size, the failing node and the cause's type, then the
    advice; the node's name and the cause's text come from torch.fx and torchvision and may change
    with their versions, so only their form is checked. A missing or wrong part fails."""
    error = _info_error(capsys, "--arch", "vit_b_16", "--image-size", "32")
    assert re.fullmatch(r"anfast info: error: VisionTransformer fails on an input of size \(2, 3, 32, 32\) "
                        r"at (module [\w.]+|\w+ \(call_\w+ [\w.]+\)): [A-Za-z_]\w*: .+; "
                        r"pass input_size=\(C, H, W\) that the model accepts", error), error


def test_info_on_a_vision_transformer_says_why_nothing_shrinks(capsys):
    """ViT's patch conv keeps full width: torchvision reshapes its output to
    (N, self.hidden_dim, H * W), a number in the model's code, and the tokens after the
    permute run whole; the warning and the table say why."""
    from anfast.cli import main

    with pytest.warns(UserWarning, match=r"no layer of VisionTransformer shrinks, so every student equals the "
                                         r"base: the layers the policy shrinks keep full width \(conv_proj: "
                                         r"channels reshape \(call_method reshape\) sizes as 768 in the model's "
                                         r"code\)"):
        assert main(["info", "--arch", "vit_b_16", "--policy", "all"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^  conv_proj +768  channels reshape \(call_method reshape\) sizes as 768", table, re.M), table


def test_train_refuses_a_model_it_cannot_adjoin_in_one_line(capsys, tmp_path):
    from anfast.cli import main
    from test_train_config import make_image_folder

    data = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    assert main(["train", "--arch", "vit_b_16", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--image-size", "32", "--batch-size", "2", "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the rest: progress bars
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("anfast train: error: cannot adjoin --arch vit_b_16 with --alpha 4: "
                                "VisionTransformer fails on an input of size (2, 3, 32, 32) at _assert"), errors
