"""anfast.train: config, CLI parsing, LR schedule, checkpoints, and the errors raised
before the first training step."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from anfast.data import DataLayoutError
from anfast.train.build import create_adjoined_model, has_apex
import anfast.cli
from anfast.runs.checkpoint import (CheckpointError, DiskFullError, get_rng_state, load_checkpoint,
                                     load_training_checkpoint, previous_checkpoint, save_checkpoint,
                                     set_rng_state, write_text_atomically)
from anfast.cli.train import add_train_arguments, config_from_args
from anfast.train.config import RESUME_FIXED, RESUME_FREE, ConfigError, TrainConfig, resume_conflicts
from anfast.train.loop import fit
from anfast.runs.schedule import lr_at


def make_image_folder(root, classes=("ant", "bee", "cat"), train_per_class=8, val_per_class=4,
                      size=16, seed=0):
    """A tiny ImageFolder: each class is a distinct colour, plus noise."""
    generator = np.random.default_rng(seed)
    colours = generator.integers(0, 256, size=(len(classes), 3))
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = colours[label] + generator.normal(0, 30, size=(size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.jpg")
    return root


def tiny_config(data, out, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), arch="resnet18", alpha=(4.0,), policy="all",
                  epochs=1, batch_size=8, image_size=16, workers=0, loader="torch", lr=0.05,
                  warmup_epochs=0.0, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- schedule


def test_lr_warmup_then_cosine_matches_hand_computed_values():
    kwargs = dict(total_steps=10, warmup_steps=4, base_lr=0.8, min_lr=0.0)
    assert [lr_at(step, **kwargs) for step in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # Cosine over steps 4..9 (5 intervals): step 4 is the peak, step 9 the floor.
    expected = [0.4 * (1 + math.cos(math.pi * i / 5)) for i in range(6)]
    assert [lr_at(step, **kwargs) for step in range(4, 10)] == pytest.approx(expected)
    assert lr_at(9, **kwargs) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, total_steps=10, warmup_steps=0, base_lr=0.8, min_lr=0.1) == pytest.approx(0.8)
    assert lr_at(9, total_steps=10, warmup_steps=0, base_lr=0.8, min_lr=0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- config + CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_cli_flags_override_yaml_which_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 3\nbatch-size: 16\nalpha: 2,4\noptimizer: adamw\n")
    config = _parse(["--config", str(yaml_file), "--epochs", "7", "--no-channels-last",
                     "--ema", "--clip-grad", "1.5"])
    assert config.epochs == 7                    # flag beats YAML
    assert config.batch_size == 16               # YAML beats default
    assert config.alpha == (2.0, 4.0)
    assert config.optimizer == "adamw"
    assert config.channels_last is False and config.ema is True and config.clip_grad == 1.5
    assert config.lr == TrainConfig().lr         # default kept
    assert TrainConfig.from_dict(config.to_dict()) == config


def _training_checkpoint(path, config: TrainConfig) -> None:
    """A checkpoint with every key a resume reads and no weights: enough for the CLI to take
    the run's options from it."""
    state = {key: None for key in ("model", "optimizer", "scaler", "ema", "rng", "classes", "epoch")}
    save_checkpoint({**state, "step": 1, "config": config.to_dict()}, path)


def test_a_resumed_runs_config_yaml_reused_for_another_out_starts_a_new_run(tmp_path):
    """config.yaml is reusable with --config: a resumed run's must not carry its --resume, or
    `--config A/config.yaml --out B` would continue A's checkpoint in B and train nothing."""
    from anfast.train.config import save_config

    run_a = tmp_path / "A"
    checkpoint = run_a / "checkpoints" / "last.pt"
    resumed = TrainConfig(out=str(run_a), resume=str(checkpoint), overwrite=True, epochs=3)
    _training_checkpoint(checkpoint, resumed)
    save_config(resumed, run_a / "config.yaml")
    config = _parse(["--config", str(run_a / "config.yaml"), "--out", str(tmp_path / "B")])
    assert config.resume is None and config.overwrite is False
    assert config == dataclasses.replace(resumed, out=str(tmp_path / "B"), resume=None, overwrite=False)


def test_a_run_started_from_pretrained_weights_resumes_once_they_are_gone(tmp_path, capsys):
    """A resume takes its weights from the checkpoint and never reads --pretrained, which the
    CLI copies from the checkpoint's config; a start from step 0 still needs the file and is
    refused in one line before the run directory is made."""
    gone = str(tmp_path / "pretrained.safetensors")
    run = tmp_path / "run"
    _training_checkpoint(run / "checkpoints" / "last.pt", TrainConfig(out=str(run), pretrained=gone))
    config = _parse(["--out", str(run), "--resume", "auto"]).validate()
    assert config.pretrained == gone and config.resume == "auto"

    refusal = f"--pretrained {gone}: no such file or folder"
    for fresh in (["--out", str(tmp_path / "new")], ["--out", str(tmp_path / "new"), "--resume", "auto"]):
        line = _one_line_error(["train", *fresh, "--pretrained", gone], capsys)
        assert line.startswith(f"anfast train: error: {refusal}"), line
    assert not (tmp_path / "new").exists()


def test_unknown_yaml_option_is_named(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) \['epoch'\]"):
        _parse(["--config", str(yaml_file)])


@pytest.mark.parametrize("alpha, message", [
    ("0.5", r"alpha=0.5: .*must be >= 1"),
    ("4,2", r"sort them ascending"),
    ("four", r"expected a number or a comma list"),
])
def test_bad_alpha_is_rejected_before_anything_runs(tmp_path, alpha, message):
    with pytest.raises(ConfigError, match=message):
        _parse(["--alpha", alpha, "--out", str(tmp_path / "run")]).validate()


def _one_line_error(argv, capsys) -> str:
    """Run `anfast ARGV`: it must fail with exit status 2 and one line on stderr."""
    assert anfast.cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "inf"], "alpha=inf: give a finite number"),
    (["--alpha", "2,nan"], "alpha=nan: give a finite number"),
    (["--warmup-epochs", "nan"], "warmup_epochs=nan: give a finite number"),
    (["--lr", "inf"], "lr=inf: give a finite number"),
    (["--weight-decay", "-1"], "weight_decay=-1.0 must be >= 0"),
    (["--momentum", "nan"], "momentum=nan: give a finite number"),
])
def test_non_finite_and_out_of_range_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    line = _one_line_error(["train", "--out", str(tmp_path / "run"), *flags], capsys)
    assert line.startswith("anfast train: error: ") and message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ('epochs: "one"\n', "epochs='one' is not a whole number"),
    ("epochs: 2.5\n", "epochs=2.5 must be a whole number"),
    ("alpha: .inf\n", "alpha=inf: give a finite number"),
    ("warmup_epochs: .nan\n", "warmup_epochs=nan: give a finite number"),
    ("lr: [1]\n", "lr=[1] is not a number"),
    ("ema: maybe\n", "ema='maybe' must be true or false"),
    ("epochs:\n", "epochs is missing a value"),
    ("alpha:\n", "alpha is missing a value; give one (default: 4)"),
    ("alpha: [[2]]\n", "alpha=[[2]]: expected a number or a comma list such as 2,4,8 (default: 4)"),
    ("alpha: true\n", "alpha=True: expected a number"),
    ("alpha: [2, false]\n", "alpha=[2, False]: expected a number"),
])
def test_bad_yaml_values_are_one_line_errors(tmp_path, capsys, yaml_text, message):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(yaml_text)
    line = _one_line_error(["train", "--config", str(yaml_file), "--out", str(tmp_path / "run")], capsys)
    assert message in line, line


def test_debug_shows_the_traceback_and_overwrite_with_resume_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    for argv in (["--debug", "train", "--alpha", "inf", "--out", out],
                 ["train", "--alpha", "inf", "--out", out, "--debug"]):
        with pytest.raises(ConfigError, match="alpha=inf: give a finite number"):
            anfast.cli.main(argv)
    line = _one_line_error(["train", "--out", str(tmp_path / "run"), "--resume", "auto", "--overwrite"],
                           capsys)
    assert "--resume auto continues the run in --out" in line and "--overwrite deletes it" in line


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("cuda:x", "--device 'cuda:x' is not a device"),
    ("meta", "--device meta: anfast trains on cpu or cuda"),
])
def test_a_bad_device_is_one_line(tmp_path, capsys, device, message):
    line = _one_line_error(["train", "--device", device, "--out", str(tmp_path / "run")], capsys)
    assert message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, capsys):
    line = _one_line_error(["train", "--device", "cuda", "--out", str(tmp_path / "run")], capsys)
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in line


def test_eval_refuses_bad_batch_size_and_workers_before_loading(tmp_path, capsys):
    # The run directory need not exist: the numbers are checked first.
    assert "--batch-size 0 must be >= 1" in _one_line_error(
        ["eval", str(tmp_path / "run"), "--batch-size", "0"], capsys)
    assert "--workers -1 must be >= 0" in _one_line_error(
        ["eval", str(tmp_path / "run"), "--workers", "-1"], capsys)


def test_resume_fixes_every_option_that_shapes_the_run_and_frees_the_rest():
    # Each option is either the run's (checked on resume) or where it runs, never neither:
    # a new option must be sorted into one of the two.
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(RESUME_FIXED) | set(RESUME_FREE) == fields
    assert not set(RESUME_FIXED) & set(RESUME_FREE)
    saved = TrainConfig(alpha=(2.0, 4.0), epochs=3).to_dict()
    assert resume_conflicts(saved, TrainConfig(alpha=(2.0, 4.0), epochs=3, workers=7, device="cpu")) == []
    assert resume_conflicts(saved, TrainConfig(alpha=(4.0,), epochs=5, lr=0.1)) == [
        "--alpha 4 (the run: 2,4)", "--epochs 5 (the run: 3)", "--lr 0.1 (the run: 0.002)"]
    assert resume_conflicts({"arch": "resnet18"}, TrainConfig(epochs=9)) == []  # absent: not compared


def test_one_image_batches_that_reach_a_1x1_batch_norm_are_refused_before_anything_runs(tmp_path):
    data = make_image_folder(tmp_path / "data")
    # resnet18 at 16 px: layer4 is 1x1, so training-mode BatchNorm sees one value per channel.
    with pytest.raises(ConfigError, match=r"^--batch-size 1 at --image-size 16: a BatchNorm layer would "
                                          r"see one value per channel .*use --batch-size 2 or more"):
        fit(tiny_config(data, tmp_path / "run", batch_size=1))
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_are_normalised(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-3 (no dot) as text; 2.0 is a whole number of epochs.
    yaml_file.write_text("lr: 1e-3\nepochs: 2.0\n")
    config = _parse(["--config", str(yaml_file)]).validate()
    assert config.lr == 0.001 and config.epochs == 2 and isinstance(config.epochs, int)


def test_arch_config_with_an_infinite_alpha_is_refused(tmp_path, capsys):
    arch = tmp_path / "arch.json"
    arch.write_text('{"groups": {"layer1.0.conv1": 1e999}}')  # json reads 1e999 as inf
    line = _one_line_error(["train", "--arch-config", str(arch), "--out", str(tmp_path / "run")], capsys)
    assert f"--arch-config {arch}: \"groups\" must map group names to finite numbers >= 1" in line


def test_missing_data_path_fails_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    assert anfast.cli.main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert f"--data {missing}: no such directory" in error
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- errors before step 1


def test_empty_class_folder_fails_before_training(tmp_path):
    data = make_image_folder(tmp_path / "data")
    (data / "train" / "dog").mkdir()
    (data / "val" / "dog").mkdir()
    with pytest.raises(DataLayoutError, match="dog"):
        fit(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_arch_name_suggests_close_names(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data")

    def no_loader(*args, **kwargs):  # the DALI loader scans every image when it is built
        raise AssertionError("a loader was built before --arch was checked")

    monkeypatch.setattr("anfast.train.loop.create_loader", no_loader)
    with pytest.raises(ConfigError, match=r"--arch 'resnet81' is not a torchvision model; did you "
                                          r"mean \[.*'resnet18'"):
        fit(tiny_config(data, tmp_path / "run", arch="resnet81"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(has_apex(), reason="apex is installed, so lamb is available")
def test_lamb_without_apex_names_the_fix(tmp_path):
    data = make_image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"--optimizer lamb .*apex.*--optimizer adamw"):
        fit(tiny_config(data, tmp_path / "run", optimizer="lamb"))
    assert not (tmp_path / "run").exists()


def test_arch_config_searched_with_other_widths_or_network_is_refused(tmp_path):
    # Trained with the default round_to 8, an arch searched at 16 built another student
    # than the one its arch.json reported.
    data = make_image_folder(tmp_path / "data")
    arch = tmp_path / "arch.json"
    arch.write_text('{"arch": "resnet18", "round_to": 16, "groups": {}}')
    with pytest.raises(ConfigError, match=r"was searched with --round-to 16, this run has --round-to 8; "
                                          r"pass --round-to 16"):
        fit(tiny_config(data, tmp_path / "run", arch_config=str(arch)))
    with pytest.raises(ConfigError, match=r"was searched with --arch resnet18, this run has --arch resnet34"):
        fit(tiny_config(data, tmp_path / "run", arch_config=str(arch), arch="resnet34", round_to=16))
    arch.write_bytes(b"\x80\x04binary")
    with pytest.raises(ConfigError, match=rf"--arch-config {arch}: expected JSON"):
        fit(tiny_config(data, tmp_path / "run", arch_config=str(arch)))
    assert not (tmp_path / "run").exists()


def test_info_and_builtin_refuse_bad_numbers(capsys):
    assert "--image-size 0 must be >= 1" in _one_line_error(["info", "--image-size", "0"], capsys)
    with pytest.raises(SystemExit):
        anfast.cli.main(["data", "builtin", "--seed", "-1"])
    assert "-1 is negative; give a seed >= 0" in capsys.readouterr().err


def test_arch_config_with_unknown_group_is_rejected_with_its_own_message(tmp_path):
    # Not re-worded as "cannot adjoin --arch resnet18 with --alpha 4", an option never given.
    arch = tmp_path / "arch.json"
    arch.write_text('{"groups": {"layer9.0.conv1": 2}}')
    with pytest.raises(ConfigError, match=r"^--arch-config names width groups \['layer9.0.conv1'\] that this model"):
        create_adjoined_model(TrainConfig(arch_config=str(arch), image_size=16), num_classes=3)


def test_arch_config_with_nested_alphas_is_refused_before_anything_runs(tmp_path, capsys):
    """--arch-config gives one student its widths: --alpha 2,4 would build two identical
    students labelled 2 and 4."""
    arch = tmp_path / "arch.json"
    arch.write_text('{"groups": {"layer3.0.conv1": 2}}')
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("alpha: [2, 4]\n")
    for given in (["--alpha", "2,4"], ["--config", str(yaml_file)]):
        line = _one_line_error(["train", "--arch-config", str(arch), *given, "--out", str(tmp_path / "run")],
                               capsys)
        assert line.startswith(f"anfast train: error: --arch-config {arch} sets each width group's alpha "
                               f"and builds one student; --alpha 2,4 asks for 2 nested students"), line
    assert not (tmp_path / "run").exists()
    assert _parse(["--arch-config", str(arch), "--alpha", "2"]).validate().alpha == (2.0,)
    # A run started before this refusal resumes with the alphas it was started with.
    old = tmp_path / "old"
    _training_checkpoint(old / "checkpoints" / "last.pt",
                         TrainConfig(out=str(old), arch_config=str(arch), alpha=(2.0, 4.0)))
    assert _parse(["--out", str(old), "--resume", "auto"]).validate().alpha == (2.0, 4.0)


# ----------------------------------------------------------------------------- checkpoints


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint({"rng": get_rng_state(), "epoch": 4}, tmp_path / "c.pt")
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    state = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(state["rng"])
    assert state["epoch"] == 4
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]


class _OnDevice(torch.Tensor):
    """A CPU tensor that behaves like a CUDA one where it matters here: numpy() refuses,
    as it does for a tensor that torch.load(map_location="cuda") put on the GPU."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_rng_state_restores_from_tensors_loaded_onto_a_gpu(tmp_path):
    # A --resume on CUDA loads the checkpoint onto the GPU (seen on an H200, 2026-11-26).
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = get_rng_state()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    on_device = {key: value.as_subclass(_OnDevice) if isinstance(value, torch.Tensor) else value
                 for key, value in state.items()}
    with pytest.raises(TypeError):
        on_device["numpy_keys"].numpy()
    set_rng_state(on_device)
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]


_WRITER = textwrap.dedent("""
    import sys, torch
    from anfast.runs.checkpoint import save_checkpoint
    path = sys.argv[1]
    version = 0
    while True:
        version += 1
        # ~8 MB so a write takes long enough to be hit mid-way.
        save_checkpoint({"version": version, "weights": torch.full((2_000_000,), float(version))}, path,
                        keep_previous=True)
        print(version, flush=True)
""")


def test_a_failed_text_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    """config.yaml, summary.json, eval.json, ... are written like checkpoints: a write that
    fails once the bytes are out (here the fsync, with a full disk) leaves the old file
    whole and no temp file; a plain write_text would have replaced the old text already."""
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 1\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFullError, match=re.escape(str(path))) as raised:
        write_text_atomically(path, "epochs: 2\n" * 1000)
    assert raised.value.needed_bytes == len("epochs: 2\n" * 1000)
    assert path.read_text() == "epochs: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_runs_set_up_removes_the_temp_file_a_killed_writer_left(tmp_path):
    """A temp file of write_text_atomically (".NAME.<random>.tmp") that a kill -9 left in
    the run folder is not a run (the folder is still free) and is gone once the next run
    has set up."""
    data = make_image_folder(tmp_path / "data")
    stale = tmp_path / "run" / ".summary.json.k9x2.tmp"
    stale.parent.mkdir()
    stale.write_text("half a file")
    fit(tiny_config(data, tmp_path / "run", epochs=1))
    assert not stale.exists() and (tmp_path / "run" / "summary.json").is_file()


def test_damaged_checkpoints_name_the_file_the_previous_one_and_the_fix(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^{path} is damaged \(zero bytes\); there is no "
                                              rf"previous checkpoint; restart with --overwrite$"):
        load_training_checkpoint(path)

    for version in (1, 2):
        save_checkpoint({"version": version}, path, keep_previous=True)
    previous = previous_checkpoint(path)
    assert load_checkpoint(previous)["version"] == 1 and load_checkpoint(path)["version"] == 2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^{path} is damaged \({len(data) // 2} bytes, "
                                              rf"unreadable: .*\); the previous checkpoint is "
                                              rf"{previous}; restart with --resume {previous} or "
                                              rf"--overwrite$"):
        load_checkpoint(path)

    torch.save({"state_dict": {}}, path)  # a torch file, but not one anfast train wrote
    with pytest.raises(CheckpointError, match=r"is damaged \(not an anfast training checkpoint: no "
                                              r"\['model', 'optimizer'"):
        load_training_checkpoint(path)


def test_a_full_disk_keeps_the_old_checkpoint_and_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"version": 1}, path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError) as error:
        save_checkpoint({"version": 2}, path, keep_previous=True)
    monkeypatch.undo()
    assert error.value.filename == str(path)
    assert re.fullmatch(rf"No space left on device \({path}\): about \d+\.\d MiB needed, \d+\.\d MiB "
                        rf"free; free disk space or choose another --out",
                        anfast.cli.user_error(error.value))
    assert load_checkpoint(path)["version"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left


def test_resume_from_another_networks_checkpoint_is_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    path = tmp_path / "other.pt"
    state = {key: None for key in ("optimizer", "scaler", "ema", "rng", "classes", "epoch", "step")}
    save_checkpoint({**state, "model": {"fc.weight": torch.zeros(3, 8)},
                     "config": {"arch": "resnet50", "alpha": [2.0], "policy": "paper"}}, path)
    line = _one_line_error(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--image-size",
                            "16", "--batch-size", "8", "--workers", "0", "--loader", "torch",
                            "--device", "cpu", "--resume", str(path)], capsys)
    assert line.startswith(f"anfast train: error: --resume {path}: its weights do not fit this network "
                           f"(Missing key(s) in state_dict: "), line
    assert "resume with the options it was trained with: {'arch': 'resnet50', 'alpha': [2.0]" in line


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_as_unsafe_and_never_run(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "executed"
    torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path} was refused as unsafe: it holds a Python object (")
    assert "weights_only" not in message
    assert not marker.exists()


def test_resume_from_a_zero_byte_checkpoint_is_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    config = tiny_config(data, run_dir)
    line = _one_line_error(["train", "--data", config.data, "--out", config.out, "--image-size", "16",
                            "--workers", "0", "--loader", "torch", "--device", "cpu",
                            "--batch-size", "8", "--resume", "auto"], capsys)
    assert (f"--resume auto: {run_dir}/checkpoints holds no usable checkpoint (last.pt is damaged "
            f"(zero bytes))") in line, line


def test_kill_9_during_checkpoint_writes_never_leaves_a_corrupt_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    rng = random.Random(0)
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)],
                                  stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one complete checkpoint exists
        time.sleep(rng.uniform(0.0, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()
        state = load_checkpoint(path)
        assert state["weights"].shape == (2_000_000,)
        assert torch.all(state["weights"] == float(state["version"])), f"attempt {attempt}"
        previous = previous_checkpoint(path)
        if state["version"] > 1 or previous.exists():  # kept since the second save
            older = load_checkpoint(previous)
            assert torch.all(older["weights"] == float(older["version"])), f"attempt {attempt}"
            assert older["version"] in (state["version"] - 1, state["version"]), f"attempt {attempt}"
