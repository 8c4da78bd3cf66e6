"""benchmarks/paper_table.py and the trainer options it uses (--objective, --teacher)."""

import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import signal
import sys

import pytest
import torch

import anfast
from anfast.adjoin import AdjoinedOutput
from anfast.train.config import ConfigError, TrainConfig
from anfast.loss import OneNetworkLoss, TaughtOutput, distillation_loss
from anfast.train.loop import fit
from test_train_config import make_image_folder, tiny_config

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load_paper_table():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("paper_table", BENCHMARKS / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distillation_loss_matches_hand_computation():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    t, weight = 4.0, 0.9
    expected = 0.0
    for row in range(3):
        p = [math.exp(v / t) for v in teacher[row].tolist()]
        q = [math.exp(v / t) for v in student[row].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        logits = student[row].tolist()
        ce = -logits[target[row]] + math.log(sum(math.exp(v) for v in logits))
        expected += (weight * t * t * kl + (1 - weight) * ce) / 3
    got = distillation_loss(student, teacher, target, temperature=t, weight=weight)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) < 1e-12, (got.item(), expected)
    # The same through the trainer's loss: a TaughtOutput distils each student.
    output = TaughtOutput(AdjoinedOutput(torch.zeros(3, 5, dtype=torch.float64), (student,)), teacher)
    assert abs(OneNetworkLoss("student")(output, target, 1.0).item() - expected) < 1e-12


def test_one_network_loss_trains_one_side_only():
    base = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    output = AdjoinedOutput(base, (student,))
    OneNetworkLoss("base")(output, target).backward()
    assert base.grad is not None and student.grad is None
    OneNetworkLoss("student")(output, target).backward()
    assert student.grad is not None
    expected = torch.nn.functional.cross_entropy(student, target)
    assert torch.allclose(OneNetworkLoss("student")(output, target), expected)


def test_teacher_needs_student_objective(tmp_path):
    with pytest.raises(ConfigError, match="--objective student"):
        TrainConfig(teacher=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="not an anfast export folder"):
        TrainConfig(objective="student", teacher=str(tmp_path)).validate()


def test_a_resumed_run_keeps_its_teacher_wherever_its_folder_moved(tmp_path):
    """--teacher says where the teacher lives (RESUME_FREE): a resume may name a copy of the
    same export, but not another network's weights, nor add a teacher to a run trained without
    one or drop the run's (each was accepted, and the rest of the run distilled from another
    network or from none); refused before anything is written."""
    data = make_image_folder(tmp_path / "data")
    teachers = []
    for seed in (0, 1):  # two exports of one architecture: same config.json, other weights
        torch.manual_seed(seed)
        teachers.append(tmp_path / f"teacher{seed}")
        anfast.export_base(anfast.adjoin("resnet18", alpha=4, num_classes=3, input_size=(3, 16, 16)),
                           path=teachers[-1])
    moved = shutil.copytree(teachers[0], tmp_path / "moved")
    stop_at_step_1 = dict(should_stop=lambda step: step == 1)
    taught, alone = tmp_path / "taught", tmp_path / "alone"
    assert fit(tiny_config(data, taught, objective="student", epochs=2, teacher=str(teachers[0])),
               **stop_at_step_1)["interrupted"]
    assert fit(tiny_config(data, alone, objective="student", epochs=2), **stop_at_step_1)["interrupted"]
    refused = (
        (taught, teachers[1], f"--teacher {teachers[1]} holds other weights than the run's teacher "
                              f"(--teacher {teachers[0]} when it was started)"),
        (taught, None, f"no --teacher (the run: --teacher {teachers[0]})"),
        (alone, teachers[0], f"--teacher {teachers[0]} (the run: none)"),
    )
    for run, teacher, conflict in refused:
        before = (run / "checkpoints" / "last.pt").read_bytes()
        with pytest.raises(ConfigError, match=re.escape(conflict)):
            fit(tiny_config(data, run, objective="student", epochs=2, resume="auto",
                            teacher=None if teacher is None else str(teacher)))
        assert (run / "checkpoints" / "last.pt").read_bytes() == before
    summary = fit(tiny_config(data, taught, objective="student", epochs=2, resume="auto", teacher=str(moved)))
    assert summary["epochs"] == 2 and not summary.get("interrupted")


def test_paper_table_end_to_end(tmp_path):
    data = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2, size=16)
    out = tmp_path / "table.json"
    paper_table = load_paper_table()
    path = paper_table.main(["--data", str(data), "--seeds", "1", "--epochs", "1", "--image-size", "16",
                             "--batch-size", "4", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert path == out
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"base", "scratch", "distilled", "adjoined", "dan"}
    for name in ("base", "scratch", "distilled", "adjoined", "dan"):
        row = result["rows"][name]
        assert 0 <= row["top1_mean"] <= 1 and row["top1_std"] == 0 and len(row["top1"]) == 1
        assert row["params"] > 0 and row["flops"] > 0
    assert result["rows"]["scratch"]["params"] == result["rows"]["adjoined"]["params"]
    assert result["rows"]["base"]["params"] > result["rows"]["scratch"]["params"]
    assert 0 <= result["rows"]["adjoined"]["base_top1_mean"] <= 1
    # The dan row trains the widths its search derived, searched at the AN student's FLOPs.
    arch = anfast.dan.read_arch(tmp_path / "work" / "dan-search-0" / "arch.json")
    adjoined = result["rows"]["adjoined"]
    base_flops = anfast.profile(anfast.export_base(anfast.adjoin("resnet18", alpha=4, num_classes=3,
                                                                 input_size=(3, 16, 16))),
                                (3, 16, 16))["flops"]
    assert arch["target"]["flops"] == pytest.approx(adjoined["flops"] / base_flops)
    assert result["rows"]["dan"]["flops"] == arch["student"]["flops"]
    assert result["rows"]["dan"]["params"] == arch["student"]["params"]
    assert result["commit"] and result["versions"]
    assert out.with_suffix(".png").is_file()
    # Row 2's network is exactly what export_student gives for this arch and alpha: the
    # same parameter names and shapes, and the count the row reports.
    scratch = anfast.load_student(tmp_path / "work" / "scratch-0" / "student")
    reference = anfast.export_student(anfast.adjoin("resnet18", alpha=4, num_classes=3,
                                                    input_size=(3, 16, 16)))
    shapes = lambda model: {name: p.shape for name, p in model.named_parameters()}  # noqa: E731
    assert shapes(scratch) == shapes(reference)
    assert sum(p.numel() for p in scratch.parameters()) == result["rows"]["scratch"]["params"]


def table_args(data, work, out, *extra):
    return ["--data", str(data), "--seeds", "1", "--epochs", "1", "--image-size", "16", "--batch-size", "4",
            "--work", str(work), "--out", str(out), *extra]


def test_paper_table_refuses_work_that_holds_runs(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2, size=16)
    work = tmp_path / "work"
    fit(tiny_config(data, work / "base-0", objective="base"))  # a finished run of the table's first row
    before = (work / "base-0" / "summary.json").read_bytes()
    paper_table = load_paper_table()
    trained = []

    class Recorded(Exception):
        """Ends the table at its first fit: what fit was asked to do is recorded."""

    def record_and_stop(config, **options):
        trained.append(config)
        raise Recorded

    monkeypatch.setattr(paper_table, "fit", record_and_stop)
    with pytest.raises(SystemExit) as refused:
        paper_table.main(table_args(data, work, tmp_path / "table.json"))
    error = capsys.readouterr().err
    assert refused.value.code == 2 and not trained, error
    assert error.count("\n") == 1 and f"--work {work} already holds runs (base-0)" in error
    assert "--overwrite" in error
    assert (work / "base-0" / "summary.json").read_bytes() == before
    # --overwrite is the explicit request: the rows' runs may then replace what is there.
    with pytest.raises(Recorded):
        paper_table.main(table_args(data, work, tmp_path / "table.json", "--overwrite"))
    assert [config.overwrite for config in trained] == [True]


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_paper_table_needs_a_seed(tmp_path, monkeypatch, capsys, seeds):
    paper_table = load_paper_table()
    monkeypatch.setattr(paper_table, "fit", lambda config, **options: pytest.fail("trained with no seed"))
    with pytest.raises(SystemExit) as refused:
        paper_table.main(["--seeds", seeds, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "t.json")])
    assert refused.value.code == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--data", "missing", "no such directory"),
    ("--alpha", "0", "alpha=0"),
    ("--alpha", "abc", "alpha='abc': expected a number"),
    ("--epochs", "0", "epochs=0 must be >= 1"),
    ("--arch", "bogus", "--arch 'bogus' is not a torchvision model"),  # raised inside fit
])
def test_paper_table_option_error_is_one_line(tmp_path, capsys, option, value, message):
    data = make_image_folder(tmp_path / "data", train_per_class=1, val_per_class=1, size=16)
    value = str(tmp_path / value) if option == "--data" else value
    with pytest.raises(SystemExit) as failed:
        load_paper_table().main([*table_args(data, tmp_path / "work", tmp_path / "t.json"), option, value])
    error = capsys.readouterr().err
    assert failed.value.code == 2, error
    assert error.startswith("paper_table: error: ") and error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("when", ["during", "after"])
def test_paper_table_stops_on_sigterm(tmp_path, monkeypatch, capsys, when):
    """SIGTERM during the base row (fit stops it with a checkpoint), or between the base
    and the scratch row: the script stops with one line naming the row, the table not
    written, and starts no later row."""
    data = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2, size=16)
    work = tmp_path / "work"
    paper_table = load_paper_table()

    def terminate(step=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return False

    def fit_with_sigterm(config, **options):
        if when == "during":
            return fit(config, should_stop=terminate, **options)  # a real SIGTERM at its first step
        summary = fit(config, **options)
        terminate()  # after the run: the handler is paper_table's own
        return summary

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached no handler of paper_table")

    monkeypatch.setattr(paper_table, "fit", fit_with_sigterm)
    previous = signal.signal(signal.SIGTERM, unhandled)  # the default action would end pytest
    try:
        with pytest.raises(SystemExit) as stopped:
            paper_table.main(table_args(data, work, tmp_path / "table.json"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    error = capsys.readouterr().err
    assert stopped.value.code == 1, error
    assert "Traceback" not in error and error.splitlines()[-1] == (
        f"paper_table: error: stopped (SIGTERM / SIGINT) during row base seed 0; nothing of the table was written")
    assert not (tmp_path / "table.json").exists() and not (tmp_path / "table.png").exists()
    assert not (work / "scratch-0").exists()
    if when == "during":  # the interrupted run kept its checkpoint
        assert (work / "base-0" / "checkpoints" / "last.pt").is_file()
    assert (work / "base-0" / "summary.json").is_file() == (when == "after")
