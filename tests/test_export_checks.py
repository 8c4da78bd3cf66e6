"""load_student refuses tampered exports before it fetches or allocates anything, and
state_dict versions survive adjoin and export (torchvision's MNASNet needs them)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

import anfast
from anfast.export import ExportError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A resnet18 (10 classes) student and base, exported once for every test here."""
    root = tmp_path_factory.mktemp("export")
    an = anfast.adjoin("resnet18", alpha=4, policy="all", num_classes=10, input_size=(3, 16, 16)).eval()
    anfast.export_student(an, path=root / "student")
    anfast.export_base(an, path=root / "base")
    return root


def _tampered(exported, tmp_path, network, edit):
    """A copy of the export ``network`` whose config.json went through ``edit(config)``."""
    target = shutil.copytree(exported / network, tmp_path / network)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("key, value", [("weights_backbone", "DEFAULT"), ("pretrained", True),
                                        ("pretrained_cfg", {"url": "https://example.com/w.pth"})])
def test_kwargs_that_fetch_weights_are_refused(exported, tmp_path, monkeypatch, key, value):
    def no_download(*args, **kwargs):
        raise AssertionError("load_student tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    path = _tampered(exported, tmp_path, "base", lambda config: config["source"]["kwargs"].update({key: value}))
    with pytest.raises(ExportError, match=rf"{path}/config.json: source.kwargs.{key}: could load weights"):
        anfast.load_student(path)


_OVERSIZED = textwrap.dedent("""
    import resource, sys
    import anfast
    from anfast.export import ExportError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        anfast.load_student(sys.argv[1])
    except ExportError as error:
        print(error)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB
""")


def test_an_oversized_classifier_is_refused_before_any_allocation(exported, tmp_path):
    # 2,000,000 classes x 512 features of float32 is 4.1 GB; the file holds 10 classes.
    path = _tampered(exported, tmp_path, "base",
                     lambda config: config["source"]["kwargs"].update(num_classes=2_000_000))
    result = subprocess.run([sys.executable, "-c", _OVERSIZED, str(path)], capture_output=True,
                            text=True, timeout=300)
    message, peak_growth_mib = result.stdout.strip().splitlines()
    assert message == (f"{path}/model.safetensors: fc.bias: the network config.json describes has "
                       f"[2000000], the file holds [10]; the export is damaged or was edited"), result.stderr
    assert int(peak_growth_mib) < 200


def test_layers_that_do_not_match_the_weights_are_refused(exported, tmp_path):
    def grow(config):
        config["layers"]["layer4.1.conv2"]["out_channels"] = 2_000_000

    path = _tampered(exported, tmp_path, "student", grow)
    with pytest.raises(ExportError, match=r"layers.layer4.1.conv2 declares layer4.1.conv2.weight of "
                                          r"shape \[2000000, 128, 3, 3\], but model.safetensors holds "
                                          r"\[128, 128, 3, 3\]"):
        anfast.load_student(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(hook="os.system"), r"config.json: hook: not a key anfast writes"),
    (lambda c: c["layers"]["layer1.0.conv1"].update(padding_mode="reflect"),
     r"layers.layer1.0.conv1: a Conv2d takes exactly .* unknown \['padding_mode'\]"),
    (lambda c: c["layers"]["layer1.0.bn1"].update(type="Linear"),
     r"layers.layer1.0.bn1: a Linear takes exactly"),
    (lambda c: c["layers"].update({"layer9.conv": c["layers"]["layer1.0.conv1"]}),
     r"layers.layer9.conv declares layer9.conv.weight of shape \[16, 16, 3, 3\], but "
     r"model.safetensors holds no such tensor"),
    (lambda c: c.update(source={"module": "evil", "kwargs": {}}), r"source: expected an object with exactly one of"),
    (lambda c: c.update(source={"torchvision": "resnet18", "kwargs": {}, "class": "x.Y"}),
     r"source: expected an object with exactly one of"),
    (lambda c: c["layers"]["layer1.0.conv1"].update(groups=3), r"layers.layer1.0.conv1: groups=3 must divide"),
])
def test_config_keys_source_types_and_layer_targets_are_checked(exported, tmp_path, edit, message):
    path = _tampered(exported, tmp_path, "student", edit)
    with pytest.raises(ExportError, match=message):
        anfast.load_student(path)


def _small_cnn(padding_mode="zeros"):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, padding_mode=padding_mode),
                               torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_a_model_whose_layers_compute_otherwise_is_refused(tmp_path):
    an = anfast.adjoin(_small_cnn(), alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    anfast.export_student(an, path=tmp_path)
    # Same tensors, but the model's first conv pads by reflection: the zero-padded
    # exported layer would silently change its outputs.
    with pytest.raises(ExportError, match=rf"{tmp_path}/config.json: layers.0: the model pads with "
                                          r"'reflect', the exported layer with zeros"):
        anfast.load_student(tmp_path, model=_small_cnn("reflect"))
    with pytest.raises(ExportError, match=r"layers.3: a Conv2d cannot replace the model's Identity"):
        anfast.load_student(tmp_path, model=torch.nn.Sequential(*list(_small_cnn())[:3], torch.nn.Identity(),
                                                                *list(_small_cnn())[4:]))


def test_mnasnet_keeps_its_state_dict_version_through_adjoin_and_export(tmp_path):
    torch.manual_seed(0)
    an = anfast.adjoin("mnasnet0_5", alpha=2, policy="all", num_classes=10, input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    student = anfast.export_student(an, path=tmp_path / "student")
    base = anfast.export_base(an)
    reference = torchvision.models.mnasnet0_5(num_classes=10).eval()
    # MNASNet._load_from_state_dict raises without the version it wrote.
    reference.load_state_dict(an.base_state_dict())
    loaded = anfast.load_student(tmp_path / "student")
    with torch.no_grad():
        out = an(x)
        for network, expected in ((student, out.students[0]), (loaded, out.students[0]),
                                  (base, out.base), (reference, out.base)):
            torch.testing.assert_close(network(x), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def builder_devices(monkeypatch):
    """The default device each model was built on: torchvision's builders, timm.create_model."""
    from anfast.models import registry

    devices = []

    def recording(builder):
        @functools.wraps(builder)
        def build(*args, **kwargs):
            devices.append(torch.get_default_device().type)
            return builder(*args, **kwargs)
        return build

    find_builder = registry._builder
    monkeypatch.setattr(registry, "_builder", lambda library, name: recording(find_builder(library, name)))
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(timm, "create_model", recording(timm.create_model))
    return devices


def test_a_consistent_huge_classifier_allocates_only_what_the_file_holds(exported, tmp_path, builder_devices):
    # A student whose classifier config.json, layers and weights all agree on 100,000
    # classes: the file holds the student's 100,000 x 128 weight, and the base network
    # (100,000 x 512: 4x as much) is never built for real.
    classes = 100_000
    path = _tampered(exported, tmp_path, "student", lambda config: (
        config["source"]["kwargs"].update(num_classes=classes), config["layers"]["fc"].update(out_features=classes)))
    state = load_file(path / "model.safetensors")
    state["fc.weight"] = torch.randn(classes, state["fc.weight"].shape[1])
    state["fc.bias"] = torch.randn(classes)
    save_file(state, path / "model.safetensors")
    loaded = anfast.load_student(path)
    assert builder_devices == ["meta"]
    assert torch.equal(loaded.fc.weight, state["fc.weight"]) and torch.equal(loaded.fc.bias, state["fc.bias"])
    assert sum(p.numel() for p in loaded.state_dict().values()) == sum(t.numel() for t in state.values())


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18d"])
def test_a_tampered_class_count_is_refused_on_meta(tmp_path, builder_devices, arch):
    an = anfast.adjoin(arch, alpha=2, num_classes=10, input_size=(3, 16, 16)).eval()
    anfast.export_base(an, path=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["source"]["kwargs"]["num_classes"] = 20_000_000  # 41 GB of base classifier
    (tmp_path / "config.json").write_text(json.dumps(config))
    builder_devices.clear()
    with pytest.raises(ExportError, match=rf"^{tmp_path}/model.safetensors: fc.bias: the network config.json "
                                          r"describes has \[20000000\], the file holds \[10\]; the export is "
                                          r"damaged or was edited$"):
        anfast.load_student(tmp_path)
    assert builder_devices and set(builder_devices) == {"meta"}  # timm: create_model, then its entrypoint


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": "10"}, r": num_classes='10' \(str\), but num_classes takes int \(default 1000\)"),
    ({"num_classes": 10.0}, r": num_classes=10.0 \(float\), but num_classes takes int \(default 1000\)"),
    ({"num_classes": 10, "zero_init_residual": 1}, r": zero_init_residual=1 \(int\), but zero_init_residual takes "
                                                   r"bool \(default False\)"),
    ({"num_classes": 10, "num_clases": 3}, r" takes no keyword argument 'num_clases' \(did "
                                           r"you mean \['num_classes', 'norm_layer'\]\?\)"),
])
def test_kwargs_the_builder_does_not_take_are_refused_in_one_line(exported, tmp_path, kwargs, message):
    path = _tampered(exported, tmp_path, "base", lambda config: config["source"].update(kwargs=kwargs))
    with pytest.raises(ExportError, match=rf"^{path}/config.json: source: torchvision model 'resnet18'{message}; "
                                          r"re-export the network$") as error:
        anfast.load_student(path)
    assert "\n" not in str(error.value)
