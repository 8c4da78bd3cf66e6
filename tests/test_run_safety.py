"""No run is replaced by accident, and every bad run or data input ends in one line.

Issue 22: `--resume auto` over unusable checkpoints, a restart before the first
checkpoint, `--overwrite` with an option that fails at set-up, a training set of
unreadable images, a damaged best.pt at eval / export, a full disk, symlink loops,
edited or hostile YAML, huge seeds. Each test hashes every file of the run directory
before and after, so "unchanged" means byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import anfast
import anfast.cli
from anfast.data import DataLayoutError, create_loader
from anfast.runs.checkpoint import (checkpoint_world_size, get_rng_state, load_checkpoint, newest_usable_checkpoint,
                                    rank_rng_state, resume_checkpoint, save_checkpoint, set_rng_state)
from anfast.train.config import ConfigError
from anfast.train.loop import fit
from anfast.runs.records import MetricsLog
from test_train_config import make_image_folder, tiny_config

_TIMING_KEYS = ("images_per_second", "epoch_seconds")


def _tree(root: Path) -> dict:
    """{relative path: content hash, link target or "dir"} of everything under ``root``."""
    entries = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def _one_line(argv, capsys) -> str:
    """Run `anfast ARGV`: exit status 2, one line on stderr, no traceback."""
    assert anfast.cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def _train_args(data, run_dir, *extra):
    return ["train", "--data", str(data), "--out", str(run_dir), "--arch", "resnet18", "--alpha", "4",
            "--policy", "all", "--epochs", "2", "--batch-size", "8", "--image-size", "16",
            "--workers", "0", "--loader", "torch", "--lr", "0.05", "--warmup-epochs", "0",
            "--device", "cpu", *extra]


def _rows(run_dir: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished two-epoch run: last.pt, last.prev.pt, best.pt, exports, summary.json."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert anfast.cli.main(_train_args(data, run_dir)) == 0
    return run_dir


@pytest.fixture
def run(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))


def _make(path: Path, kind: str) -> None:
    """Replace the checkpoint ``path`` by an unusable ``kind`` of entry."""
    path.unlink(missing_ok=True)
    if kind == "dangling symlink":
        path.symlink_to(path.parent / "gone.pt")
    elif kind == "symlink loop":
        path.symlink_to(path.name)
    elif kind == "directory":
        path.mkdir()
    elif kind == "damaged":
        path.write_bytes(b"\x00" * 100)


# ---------------------------------------------------------------- defect 2: --resume auto


@pytest.mark.parametrize("last", ["missing", "directory"])
def test_resume_auto_without_a_usable_last_pt_continues_from_the_newest_usable_checkpoint(
        run, data, capsys, last):
    before = _rows(run)
    (run / "checkpoints" / "best.pt").unlink()  # its epoch depends on the accuracies; see the next test
    _make(run / "checkpoints" / "last.pt", last)
    assert anfast.cli.main(_train_args(data, run, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run}/checkpoints/last.prev.pt at epoch 2" in out, out
    # Epoch 2 again from the epoch-1 checkpoint, as the first run did: same numbers, not a fresh run.
    assert _rows(run) == before
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True, mmap=True)["epoch"] == 2
    if last == "directory":
        assert f"{run}/checkpoints/last.pt is a directory; renamed it last.unusable.pt" in out, out
        assert (run / "checkpoints" / "last.unusable.pt").is_dir()


def test_the_newest_usable_checkpoint_wins_and_last_pt_wins_a_tie(tmp_path):
    state = {key: None for key in ("model", "optimizer", "scaler", "ema", "rng", "config", "classes", "epoch")}
    for name, step in (("last.prev.pt", 10), ("best.pt", 20), ("last.pt", 20)):
        save_checkpoint({**state, "step": step}, tmp_path / name)
    assert newest_usable_checkpoint(tmp_path) == (tmp_path / "last.pt", {})
    _make(tmp_path / "last.pt", "damaged")
    path, unusable = newest_usable_checkpoint(tmp_path)
    assert path == tmp_path / "best.pt" and list(unusable) == ["last.pt"]
    assert unusable["last.pt"].startswith("damaged (100 bytes, unreadable")


def test_resume_auto_continues_last_pt_whenever_it_loads_even_behind_the_others(tmp_path):
    """A run resumed by name from last.prev.pt (as a damaged last.pt's message advises) and
    stopped again has a last.pt with fewer steps than last.prev.pt and best.pt: auto
    continues where it last stopped (it once chose last.prev.pt, then failed with
    KeyError 'last.pt' while setting a loadable last.pt aside as unusable)."""
    checkpoints = tmp_path / "checkpoints"
    state = {key: None for key in ("model", "optimizer", "scaler", "ema", "rng", "config", "classes", "epoch")}
    for name, step in (("last.prev.pt", 5), ("best.pt", 3), ("last.pt", 4)):
        save_checkpoint({**state, "step": step}, checkpoints / name)
    assert resume_checkpoint("auto", tmp_path) == checkpoints / "last.pt"
    # Unusable, last.pt gives way to the newer of the others.
    _make(checkpoints / "last.pt", "directory")
    assert resume_checkpoint("auto", tmp_path) == checkpoints / "last.prev.pt"


def test_each_rank_resumes_its_own_rng_states_and_an_older_checkpoint_its_single_one(tmp_path):
    """Checkpoints list every rank's RNG states (each rank was seeded seed + rank); one
    written before holds a single state, rank 0's, which every rank takes as it did then."""
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(get_rng_state())
    save_checkpoint({"rng": states}, tmp_path / "per_rank.pt")
    save_checkpoint({"rng": states[0]}, tmp_path / "older.pt")
    per_rank, older = load_checkpoint(tmp_path / "per_rank.pt"), load_checkpoint(tmp_path / "older.pt")
    assert checkpoint_world_size(per_rank) == 2 and checkpoint_world_size(older) is None
    for checkpoint, rank, seed in ((per_rank, 0, 0), (per_rank, 1, 1), (older, 0, 0), (older, 1, 0)):
        set_rng_state(rank_rng_state(checkpoint, rank))
        drawn = torch.rand(4)
        torch.manual_seed(seed)
        assert torch.equal(drawn, torch.rand(4)), (rank, seed)


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink loop", "directory", "damaged"])
def test_resume_auto_with_no_usable_checkpoint_is_refused_and_keeps_the_run(run, data, capsys, kind):
    checkpoints = run / "checkpoints"
    _make(checkpoints / "last.pt", kind)
    (checkpoints / "last.prev.pt").unlink()
    _make(checkpoints / "best.pt", "damaged")
    before = _tree(run)
    line = _one_line(_train_args(data, run, "--resume", "auto"), capsys)
    assert line.startswith(f"anfast train: error: --resume auto: {checkpoints} holds no usable "
                           f"checkpoint (last.pt is {'damaged' if kind == 'damaged' else 'a ' + kind}"), line
    assert "best.pt is damaged (100 bytes, unreadable" in line and "--overwrite (which deletes it)" in line
    assert _tree(run) == before


# ---------------------------------------------------------------- defect 3: no checkpoint yet


def _killed_before_the_first_checkpoint(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    for name in ("summary.json", "curves.png", "tradeoff.png"):
        (run / name).unlink()
    for name in ("base", "student", "tensorboard"):
        shutil.rmtree(run / name)
    (run / "metrics.jsonl").write_text("")


def test_the_readme_recovery_command_restarts_the_run_from_its_own_config(run, capsys):
    _killed_before_the_first_checkpoint(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert anfast.cli.main(["train", "--out", str(run), "--resume", "auto"]) == 0
    assert "train images" in capsys.readouterr().out
    again = yaml.safe_load((run / "config.yaml").read_text())
    # The run's --data, --epochs, ..., not the defaults (out: the fixture's copy moved it).
    assert {**again, "resume": None, "out": saved["out"]} == saved
    assert len(_rows(run)) == saved["epochs"] == 2


def test_a_restart_with_changed_options_or_over_finished_work_is_refused(run, capsys):
    _killed_before_the_first_checkpoint(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    before = _tree(run)
    with pytest.raises(ConfigError, match=r"restarts the run in --out .* from its "
                                                              r"config.yaml .*--epochs 3 \(the run: 2\)"):
        fit(tiny_config(saved["data"], run, resume="auto", epochs=3))
    assert _tree(run) == before

    (run / "summary.json").write_text("{}\n")
    before = _tree(run)
    line = _one_line(["train", "--out", str(run), "--resume", "auto"], capsys)
    assert line.startswith(f"anfast train: error: --resume auto: {run} holds a run (summary.json) but "
                           f"no checkpoint to continue it from"), line
    assert _tree(run) == before


# ---------------------------------------------------------------- defect 5: --overwrite


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_overwrite_with_a_backend_this_machine_cannot_run_keeps_the_run(run, data, tmp_path, capsys):
    before = _tree(run)
    line = _one_line(_train_args(data, run, "--overwrite", "--backend", "cuda"), capsys)
    assert line.startswith("anfast train: error: --backend cuda cannot run "), line
    assert "use --backend auto (or torch)" in line
    assert _tree(run) == before

    fresh = tmp_path / "fresh"
    _one_line(_train_args(data, fresh, "--backend", "cuda"), capsys)
    assert not fresh.exists()  # nothing left that would make the next run refuse --out


@pytest.mark.parametrize("environment, message", [
    ("gemm", "$ANFAST_BACKEND=gemm cannot run layer1.0.conv1 on cpu: "),
    ("bogus", "$ANFAST_BACKEND=bogus is not a backend: choose one of gemm, cuda, triton, torch, or unset it"),
])
def test_overwrite_with_an_anfast_backend_that_cannot_run_keeps_the_run(run, data, capsys, monkeypatch,
                                                                        environment, message):
    """$ANFAST_BACKEND names the backend of a --backend auto run: checked at set-up like
    --backend (it once deleted the old run, then failed at step 1 with a traceback)."""
    monkeypatch.setenv("ANFAST_BACKEND", environment)
    before = _tree(run)
    line = _one_line(_train_args(data, run, "--overwrite"), capsys)
    assert line.startswith(f"anfast train: error: {message}"), line
    assert _tree(run) == before


def test_overwrite_removes_every_kind_of_run_the_folder_held(tmp_path):
    """--overwrite replaces the folder's run whatever command made it: a training over a
    search leaves no arch.json / widths.png beside it, a search over a training no exports
    or summary.json; files of neither kind stay."""
    from anfast.runs.rundir import SEARCH_ARTIFACTS, TRAIN_ARTIFACTS, claim_run_dir

    for old, new in ((SEARCH_ARTIFACTS, TRAIN_ARTIFACTS), (TRAIN_ARTIFACTS, SEARCH_ARTIFACTS)):
        run_dir = tmp_path / f"run{len(old)}"
        run_dir.mkdir()
        for pattern in old:
            path = run_dir / pattern.replace("*", "s2")
            path.mkdir() if "." not in pattern else path.write_text("old run")
        (run_dir / "notes.txt").write_text("the user's")
        lock = claim_run_dir(run_dir, new, resume=True, overwrite=True)
        try:
            lock.remove_previous_run()
        finally:
            lock.release()
        assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- defect 6: unreadable data


def test_a_training_set_with_no_readable_image_is_refused_on_the_torch_loader(data, tmp_path, capsys):
    broken = Path(shutil.copytree(data, tmp_path / "broken"))
    for path in (broken / "train").rglob("*.jpg"):
        path.write_bytes(b"not an image")
    with pytest.raises(DataLayoutError, match=rf"^{broken}/train holds 24 image file\(s\) and none can "
                                              rf"be decoded \(first: "):
        create_loader(broken, "train", batch_size=8, image_size=16, loader="torch", workers=0)
    run_dir = tmp_path / "run"
    line = _one_line(_train_args(broken, run_dir), capsys)
    assert "none can be decoded" in line and f"anfast data check {broken}" in line, line
    assert not run_dir.exists()


def test_a_symlink_loop_among_the_images_is_one_line(data, tmp_path, capsys):
    loopy = Path(shutil.copytree(data, tmp_path / "loopy"))
    (loopy / "train" / "ant" / "a.jpg").symlink_to("b.jpg")
    (loopy / "train" / "ant" / "b.jpg").symlink_to("a.jpg")
    line = _one_line(_train_args(loopy, tmp_path / "run"), capsys)
    assert re.match(rf"anfast train: error: {loopy}/train/ant/[ab].jpg: Too many levels of "
                    rf"symbolic links; remove it", line), line  # whichever the scan meets first


# ---------------------------------------------------------------- degraded cases


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_damaged_best_pt_names_the_intact_last_pt_never_overwrite(run, capsys, command):
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    before = _tree(run)
    line = _one_line([command, str(run)], capsys)
    assert line.startswith(f"anfast {command}: error: {best} is damaged (1000 bytes, unreadable"), line
    assert f"{run}/checkpoints/last.pt is intact: pass --checkpoint last" in line
    assert "--overwrite" not in line
    assert _tree(run) == before


def _full_disk(*args, **kwargs):
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as error:  # what torch.save and safetensors do: a RuntimeError above the OSError
        raise RuntimeError("PytorchStreamWriter failed writing file") from error


@pytest.mark.parametrize("write, path", [
    ("torch.save", "checkpoints/last.pt"),
    ("metrics", "metrics.jsonl"),
    ("exports", "base"),
])
def test_a_full_disk_is_one_line_naming_the_path_and_the_space_needed(data, tmp_path, monkeypatch,
                                                                       capsys, write, path):
    if write == "torch.save":
        monkeypatch.setattr(torch, "save", _full_disk)
    elif write == "metrics":
        monkeypatch.setattr(MetricsLog, "log", _full_disk)
    else:
        monkeypatch.setattr(anfast.export, "save_exported", _full_disk)  # what train.export calls
    run_dir = tmp_path / "run"
    line = _one_line(_train_args(data, run_dir, "--epochs", "1"), capsys)
    assert line.startswith(f"anfast train: error: No space left on device ({run_dir / path}): about "), line
    assert " MiB needed, " in line and line.endswith(" MiB free; free disk space or choose another --out "
                                                     "(--debug shows the traceback)"), line


def test_an_edited_config_yaml_at_export_is_one_line_naming_it(run, capsys):
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("image_size: 16", "image_size: large"))
    line = _one_line(["export", str(run)], capsys)
    assert line.startswith(f"anfast export: error: {config}: image_size='large' is not a whole number"), line
    assert "restore the file `anfast train` wrote" in line

    marker = run / "executed"
    config.write_text(f"arch: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    line = _one_line(["export", str(run)], capsys)
    assert line.startswith(f"anfast export: error: {config} is not a YAML file of plain option: value "
                           f"lines ("), line
    assert not marker.exists()


def test_yaml_tags_in_config_are_refused_and_never_run(tmp_path, capsys):
    marker, options = tmp_path / "executed", tmp_path / "options.yaml"
    options.write_text(f"seed: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    line = _one_line(["train", "--config", str(options), "--out", str(tmp_path / "run")], capsys)
    assert line.startswith(f"anfast train: error: {options} is not a YAML file of plain option: value "
                           f"lines (could not determine a constructor for the tag"), line
    assert not marker.exists()


@pytest.mark.parametrize("flags, yaml_text", [
    (["--seed", str(2**70)], None),
    ([], "seed: 1e30\n"),
])
def test_seeds_torch_and_numpy_cannot_take_are_refused_at_config_time(tmp_path, capsys, flags, yaml_text):
    if yaml_text is not None:
        (tmp_path / "options.yaml").write_text(yaml_text)
        flags = ["--config", str(tmp_path / "options.yaml")]
    line = _one_line(["train", "--out", str(tmp_path / "run"), *flags], capsys)
    assert "must be in [0, 2147483647]" in line, line
    assert not (tmp_path / "run").exists()


def test_a_run_that_stops_on_a_non_finite_loss_exits_1_with_one_line(data, tmp_path, capsys):
    """Not bad input but a run that stopped itself: the one error printer, exit status 1."""
    run_dir = tmp_path / "run"
    status = anfast.cli.main(_train_args(data, run_dir, "--epochs", "2", "--lr", "1e30", "--momentum", "0"))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("anfast train: error: step ") and "is not finite" in lines[0], lines[0]
