"""Bad CLI input ends in one line (or argparse's usage error), before any work is done.

`anfast tune --out` never replaces a file that is not an earlier tune's JSON (a run's
config.yaml), and a folder or a path under a file is refused before the first layer is
tuned; a file or folder in the way of a path (EEXIST, EISDIR, ENOTDIR) is a user error
for the one error printer (anfast.cli.user_error); an empty --backends and a negative
`data check --workers` are refused with the fix, and so is a train flag that does
nothing without another option (--ema-decay without --ema); `anfast eval --device cpu`
of a run trained with --amp fp16 evaluates it in fp32.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import anfast.cli
from anfast.ops import tuning
from anfast.ops.tuning import Tuner
from helpers import FakeTimer
from test_run_safety import _one_line
from test_train_config import make_image_folder


def _tune_args(out) -> list:
    """One layer of a small resnet18, torch only: the fake timer makes it take a second."""
    return ["tune", "--device", "cpu", "--arch", "resnet18", "--batch-size", "2", "--image-size", "32",
            "--backends", "torch", "--layers", "layer1.0.conv1", "--out", str(out)]


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A CPU tuner whose timer counts the timings (none before a refusal), its cache in tmp_path."""
    monkeypatch.setenv("ANFAST_CACHE_DIR", str(tmp_path / "cache"))
    fresh = Tuner(timer=FakeTimer({"torch": 1.0}), lazy_devices=("cpu",))
    monkeypatch.setattr(tuning, "_tuner", fresh)
    return fresh


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch `anfast train` run directory."""
    root = tmp_path_factory.mktemp("finished")
    data = make_image_folder(root / "data")
    run_dir = root / "run"
    assert anfast.cli.main(["train", "--data", str(data), "--out", str(run_dir), "--arch", "resnet18",
                            "--alpha", "4", "--policy", "all", "--epochs", "1", "--batch-size", "8",
                            "--image-size", "16", "--workers", "0", "--loader", "torch",
                            "--warmup-epochs", "0", "--device", "cpu"]) == 0
    return run_dir


# ------------------------------------------------------------- D6: --out is a run's file


def test_tune_refuses_to_replace_a_file_it_did_not_write_and_replaces_its_own(
        finished, tuner, tmp_path, capsys, monkeypatch):
    config, summary = finished / "config.yaml", finished / "summary.json"
    before = {path: path.read_bytes() for path in (config, summary)}
    line = _one_line(_tune_args(config), capsys)
    assert str(config) in line and "--out" in line and "not a JSON `anfast tune` wrote" in line, line
    assert str(summary) in _one_line(_tune_args(summary), capsys)  # a JSON, not a tune's
    assert {path: path.read_bytes() for path in before} == before and tuner.timer.calls == 0
    with monkeypatch.context() as torch_only:  # eval's convs need no tuning
        torch_only.setenv("ANFAST_BACKEND", "torch")
        assert anfast.cli.main(["eval", str(finished), "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()

    # An earlier tune's JSON is replaced (the documented workflow).
    out = tmp_path / "tune.json"
    assert anfast.cli.main(_tune_args(out)) == 0
    first = json.loads(out.read_text())
    assert first["complete"] and [row["cached"] for row in first["layers"]] == [False]
    assert anfast.cli.main(_tune_args(out)) == 0
    second = json.loads(out.read_text())  # the second tune's: it read the first's decision
    assert second["complete"] and [row["cached"] for row in second["layers"]] == [True]
    assert [row["layer"] for row in second["layers"]] == ["layer1.0.conv1"]


# ------------------------------------------------ eval of an fp16 run off CUDA


def test_eval_of_an_fp16_run_on_the_cpu_runs_in_fp32_and_says_so(finished, tmp_path, capsys, monkeypatch):
    """Training refuses --amp fp16 off CUDA; eval, which has no --amp flag, evaluates such a
    run in fp32 there (it told the user to pass --amp): the numbers of the run's own fp32
    evaluation of the same weights (one epoch: best.pt is its epoch-0 row of metrics.jsonl)."""
    import yaml

    run = tmp_path / "fp16"
    run.mkdir()
    (run / "checkpoints").symlink_to(finished / "checkpoints")
    config = yaml.safe_load((finished / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "amp": "fp16"}, sort_keys=False))
    monkeypatch.setenv("ANFAST_BACKEND", "torch")  # eval's convs need no tuning
    monkeypatch.setattr("anfast.train.evaluate.network_costs", lambda an, image_size: None)  # not checked here
    assert anfast.cli.main(["eval", str(run), "--device", "cpu", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert (f"anfast eval: {run} trained with --amp fp16, whose autocast runs on CUDA only; "
            f"evaluating on cpu in fp32") in out, out

    def numbers(row):
        return [[network[key] for key in ("top1", "top5", "loss")] for network in (row["base"], *row["students"])]

    trained, = (json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines())
    assert numbers(json.loads((run / "eval.json").read_text())) == numbers(trained)
    with pytest.raises(SystemExit):  # eval's --device: what resolve_device(device or "auto") does
        anfast.cli.main(["eval", "--help"])
    assert "(default: auto, cuda if available, else cpu;" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------- G4: --out a folder or under a file, errnos


@pytest.mark.parametrize("out, named", [("runs", "runs"), ("afile/t.json", "afile"),
                                        ("afile/sub/t.json", "afile")])
def test_tune_refuses_an_out_it_cannot_write_before_tuning_a_layer(tuner, tmp_path, capsys, out, named):
    (tmp_path / "runs").mkdir()
    (tmp_path / "afile").write_text("a file\n")
    line = _one_line(_tune_args(tmp_path / out), capsys)
    assert str(tmp_path / named) in line and "--out" in line, line
    assert tuner.timer.calls == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "runs"]
    assert list((tmp_path / "runs").iterdir()) == [] and (tmp_path / "afile").read_text() == "a file\n"


@pytest.mark.parametrize("code", [errno.EEXIST, errno.EISDIR, errno.ENOTDIR])
def test_a_file_or_folder_in_the_way_is_a_user_error_naming_the_path(tmp_path, code):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("")
    make = {errno.EEXIST: lambda: os.mkdir(tmp_path / "afile"),
            errno.EISDIR: lambda: os.replace(tmp_path / "afile", tmp_path / "folder"),
            errno.ENOTDIR: lambda: open(tmp_path / "afile" / "x", "w")}
    with pytest.raises(OSError) as raised:
        make[code]()
    assert raised.value.errno == code
    message = anfast.cli.user_error(raised.value)
    assert message is not None and "\n" not in message
    assert str(tmp_path / ("folder" if code == errno.EISDIR else "afile")) in message, message


# ------------------------------------------------------- G5: data builtin --root a file


def test_data_builtin_with_a_file_as_root_is_one_line(tmp_path, capsys):
    root = tmp_path / "afile"
    root.write_text("a file\n")
    line = _one_line(["data", "builtin", "--root", str(root)], capsys)
    assert line.startswith("anfast data: error: ") and str(root) in line, line
    assert root.read_text() == "a file\n" and sorted(tmp_path.iterdir()) == [root]


# ------------------------------------------- G8: empty --backends, negative --workers


@pytest.mark.parametrize("backends", ["", " , "])
def test_tune_with_an_empty_backend_list_says_so_and_what_to_give(tuner, capsys, backends):
    line = _one_line(["tune", "--device", "cpu", "--backends", backends], capsys)
    assert "names no backend" in line and "unknown" not in line, line
    assert "gemm,cuda,triton,torch" in line and tuner.timer.calls == 0


def test_data_check_refuses_negative_workers_as_argparse_does(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("a",), train_per_class=1, val_per_class=1)
    with pytest.raises(SystemExit) as exited:
        anfast.cli.main(["data", "check", str(data), "--workers", "-1"])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert "argument --workers: -1 must be >= 0" in captured.err and captured.out == "", captured
    with pytest.raises(SystemExit):
        anfast.cli.main(["data", "check", str(data), "--workers", "abc"])
    assert "argument --workers: 'abc' is not a whole number" in capsys.readouterr().err
    assert anfast.cli.main(["data", "check", str(data), "--workers", "0"]) == 0
    assert "train: 1 images, 0 unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("flags, needed", [
    (["--ema-decay", "0.99"], "--ema"),
    (["--distill-temperature", "2"], "--teacher"),
    (["--distill-weight", "0.5"], "--teacher"),
])
def test_a_flag_that_acts_only_with_another_option_is_refused_alone(tmp_path, capsys, flags, needed):
    """--ema-decay without --ema (or --distill-* without --teacher) would change nothing:
    refused before the run directory is made; with the option, or from a run's own
    config.yaml (which holds every option) given as --config, it is accepted."""
    from anfast.cli.train import config_from_args
    from anfast.train.config import TrainConfig, save_config

    out = tmp_path / "run"
    line = _one_line(["train", "--out", str(out), "--device", "cpu", *flags], capsys)
    assert line.startswith(f"anfast train: error: {flags[0]} {flags[1]} does nothing without {needed};"), line
    assert f"leave {flags[0]} out" in line and not out.exists()

    saved = tmp_path / "config.yaml"
    save_config(TrainConfig(), saved)  # ema: false, distill_*: set, no teacher
    parse = anfast.cli.build_parser().parse_args
    assert config_from_args(parse(["train", "--config", str(saved)])) == TrainConfig()
    if needed == "--ema":
        assert config_from_args(parse(["train", "--ema", *flags])).ema_decay == 0.99
    else:
        teacher = tmp_path / "teacher"
        teacher.mkdir()
        (teacher / "config.json").write_text("{}")
        config = config_from_args(parse(["train", "--objective", "student", "--teacher", str(teacher),
                                         *flags]))
        assert getattr(config, flags[0][2:].replace("-", "_")) == float(flags[1])
