"""--pretrained: a trained base starts the adjoined network; bad checkpoints name the file and the key."""

import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import anfast
from anfast.train.config import ConfigError
from anfast.train.loop import fit
from anfast.runs.pretrained import load_pretrained
from test_train_config import make_image_folder, tiny_config

SIZE = (3, 16, 16)


def _trained_resnet18(num_classes=4):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model(torch.randn(8, *SIZE))  # train mode: running statistics move off (0, 1)
    return model.eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_starts_base_and_student_slices(tmp_path, suffix):
    model = _trained_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, path)  # a training script's wrapper
    else:
        save_file(model.state_dict(), path)
    an = anfast.adjoin("resnet18", alpha=4, policy="all", num_classes=4, input_size=SIZE)
    load_pretrained(an, str(path))
    an.eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(an(x).base, model(x))
    # The student's private norm is the base norm's leading slice; its convs are slices anyway.
    student_norm = an.get_submodule("layer2.0.bn1").student_norms[0]
    width = student_norm.num_features
    assert width < 128
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(student_norm, name), getattr(model.layer2[0].bn1, name)[:width]), name


def test_export_folder_and_skip_classifier(tmp_path):
    source = anfast.adjoin(_trained_resnet18(num_classes=4), alpha=2, input_size=SIZE).eval()
    anfast.export_base(source, path=tmp_path / "base")
    anfast.export_student(source, path=tmp_path / "student")
    an = anfast.adjoin("resnet18", alpha=4, policy="all", num_classes=7, input_size=SIZE)
    with pytest.raises(ConfigError, match=r"base.*fc.weight \(4, 512\) in the file vs \(7, 512\).*"
                                          r"--pretrained-skip-classifier"):
        load_pretrained(an, str(tmp_path / "base"))
    fresh_fc = an.fc.weight.detach().clone()
    load_pretrained(an, str(tmp_path / "base"), skip_classifier=True)
    assert torch.equal(an.fc.weight, fresh_fc)
    assert torch.equal(an.conv1.weight, source.conv1.weight)
    with pytest.raises(ConfigError, match=r"student.*an export of the student.*pass the run's base/"):
        load_pretrained(an, str(tmp_path / "student"))


def test_bad_checkpoints_name_the_file_and_the_key(tmp_path):
    an = anfast.adjoin("resnet18", alpha=4, num_classes=4, input_size=SIZE)
    state = _trained_resnet18().state_dict()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"garbage.pt: torch.load\(weights_only=True\) cannot read it"):
        load_pretrained(an, str(garbage))
    torch.save({**state, "epoch": 3}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"extra.pt: key 'epoch' holds a int, not a tensor"):
        load_pretrained(an, str(tmp_path / "extra.pt"))
    del state["layer3.1.conv2.weight"]
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"other.pth: keys do not match.*missing \['layer3.1.conv2.weight'\]"
                                          r".*unexpected \['head.weight'\]"):
        load_pretrained(an, str(tmp_path / "other.pth"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=r"broken.safetensors: not a readable safetensors file"):
        load_pretrained(an, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConfigError, match=r"--pretrained .*nowhere.pt: no such file"):
        fit(tiny_config(tmp_path, tmp_path / "run", pretrained=str(tmp_path / "nowhere.pt")))


def _zero_byte_file(tmp_path):
    (tmp_path / "empty.pt").touch()
    return tmp_path / "empty.pt", r"empty.pt: torch.load\(weights_only=True\) cannot read it \(EOFError\)"


def _export_folder_with(text):
    def make(tmp_path):
        folder = tmp_path / "base"
        folder.mkdir()
        (folder / "config.json").write_text(text)
        save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
        return folder, r"base: config.json " + {"{not json": "is not valid JSON \\(JSONDecodeError: Expecting",
                                                "[1, 2]": "holds a list, not the object anfast export writes"}[text]
    return make


@pytest.mark.parametrize("make", [_zero_byte_file, _export_folder_with("{not json"), _export_folder_with("[1, 2]")],
                         ids=["zero-byte file", "bad JSON", "JSON list"])
def test_unreadable_pretrained_paths_end_the_cli_in_one_line(tmp_path, capsys, make):
    from anfast.cli import main

    path, message = make(tmp_path)
    data = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--pretrained", str(path),
                 "--epochs", "1", "--batch-size", "2", "--image-size", "16", "--workers", "0",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the rest: progress bars
    assert "Traceback" not in err and len(errors) == 1, err
    error = errors[0]
    assert re.match(rf"anfast train: error: --pretrained \S*{message}.*; (save a state_dict|write the folder "
                    r"again with anfast export RUN_DIR)", error), error


def test_a_pretrained_run_trains_from_the_files_weights(tmp_path):
    """fit starts the network it trains from --pretrained: after an epoch at a learning rate
    of 1e-12 the run's exported base holds the file's convs and classifier, and its student
    their slices (a --pretrained that loaded nothing, or was overwritten before the first
    step, would leave the fresh initialisation, about 0.1 away). What is loaded where is
    checked above; the run's one-epoch head start it gives was measured once (49.3% against
    31.0% top-1 on 5 built-in classes; 31.0% against 31.0% with the weights left unloaded)."""
    source = anfast.adjoin(_trained_resnet18(num_classes=3), alpha=2, input_size=SIZE)
    anfast.export_base(source, path=tmp_path / "pretrained")
    data = make_image_folder(tmp_path / "data")
    fit(tiny_config(data, tmp_path / "run", pretrained=str(tmp_path / "pretrained"), lr=1e-12))
    base, student = (anfast.load_student(tmp_path / "run" / name) for name in ("base", "student"))
    for name in ("conv1.weight", "layer2.0.conv2.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        expected = source.get_parameter(name).detach()
        assert torch.allclose(base.get_parameter(name), expected, rtol=0, atol=1e-9), name
        got = student.get_parameter(name)
        assert got.shape != expected.shape or name.startswith("fc."), name  # "all": the student is narrower
        sliced = expected[tuple(slice(0, size) for size in got.shape)]
        assert torch.allclose(got, sliced, rtol=0, atol=1e-9), name
