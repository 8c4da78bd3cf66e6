"""Nothing is ever fetched (issue 22, defect 1): torchvision's detection and segmentation
builders default ``weights_backbone`` to ImageNet weights, and --arch, adjoin(str) and
load_student each built them with that default."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.hub

import anfast
from anfast.adjoin import AdjoinError
from anfast.cli import main
from anfast.export import ExportError


@pytest.fixture
def network_attempts(monkeypatch):
    """Every way out to the network raises and is recorded: sockets and torch.hub."""
    attempts = []

    def refuse(what):
        def attempt(*args, **kwargs):
            attempts.append((what, args[1:2] if what == "socket.connect" else args[:1]))
            raise ConnectionRefusedError(f"test: {what} tried to reach the network")
        return attempt

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("torch.hub.download_url_to_file"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("torch.hub.load_state_dict_from_url"))
    # torchvision and timm bind load_state_dict_from_url at import: patch their names too.
    import timm.models._builder
    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url",
                        refuse("torchvision load_state_dict_from_url"))
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse("timm load_state_dict_from_url"))
    return attempts


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Downloading" not in captured.err + captured.out, captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err.strip()


def test_info_on_a_detection_model_downloads_nothing(network_attempts, capsys):
    # Built without its ImageNet backbone, then refused by the tracer in one line.
    error = _one_line_error(capsys, ["info", "--arch", "fasterrcnn_resnet50_fpn"])
    assert error.startswith("anfast info: error: cannot trace FasterRCNN with torch.fx:"), error
    assert network_attempts == []


def test_train_on_a_detection_model_downloads_nothing(network_attempts, capsys, tmp_path):
    # Synthetic data: the built-in set, where this machine has not drawn it yet, would put its
    # progress bars on stderr before the model's error.
    error = _one_line_error(capsys, ["train", "--arch", "ssdlite320_mobilenet_v3_large", "--data", "synthetic",
                                     "--out", str(tmp_path)])
    assert error.startswith("anfast train: error: cannot adjoin --arch ssdlite320_mobilenet_v3_large"), error
    assert "cannot trace SSD with torch.fx" in error
    assert network_attempts == []


def test_adjoin_of_a_detection_model_name_downloads_nothing(network_attempts):
    with pytest.raises(AdjoinError, match=r"^cannot trace FasterRCNN with torch.fx"):
        anfast.adjoin("fasterrcnn_resnet50_fpn")
    model, source = anfast.models.create_model("fasterrcnn_resnet50_fpn", num_classes=3)
    assert type(model).__name__ == "FasterRCNN" and source["kwargs"] == {"num_classes": 3}
    assert network_attempts == []


def test_an_export_naming_a_segmentation_model_downloads_nothing(network_attempts, tmp_path):
    an = anfast.adjoin("resnet18", alpha=2, num_classes=3, input_size=(3, 16, 16)).eval()
    anfast.export_base(an, path=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["source"] = {"torchvision": "deeplabv3_resnet50", "kwargs": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    # Built on meta without its backbone's weights, then refused: its tensors are not the file's.
    with pytest.raises(ExportError, match=rf"^{tmp_path}/model.safetensors: backbone.bn1.bias: the network "
                                          r"config.json describes has \[64\], the file holds no such tensor"):
        anfast.load_student(tmp_path)
    assert network_attempts == []


def test_weights_a_signature_requires_are_refused(monkeypatch):
    import torchvision

    def needs_weights(*, weights: torchvision.models.ResNet18_Weights, **kwargs) -> torchvision.models.ResNet:
        return torchvision.models.resnet18(weights=weights, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model_builder", lambda name: needs_weights)
    with pytest.raises(ValueError, match=r"torchvision model 'resnet18' cannot be built without weights "
                                         r"\(weights is required\)"):
        anfast.models.create_model("resnet18")
