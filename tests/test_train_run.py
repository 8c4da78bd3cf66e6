"""anfast.train end to end on a tiny ImageFolder: artifacts, resume, signals, bad images,
eval / export, non-finite loss, torchrun."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import anfast
import anfast.cli
from anfast.runs.checkpoint import load_checkpoint
from anfast.train.config import ConfigError
from anfast.train.export import evaluate_run, export_run, load_run
from anfast.train.loop import NonFiniteLossError, fit
from test_run_safety import _one_line
from test_train_config import make_image_folder, tiny_config

pytestmark = pytest.mark.slow

_TIMING_KEYS = ("images_per_second", "epoch_seconds")


def _without_timings(rows):
    return [{k: v for k, v in row.items() if k not in _TIMING_KEYS} for row in rows]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


class _Training:
    """A training command in a subprocess of its own session, its output read on a thread.

    No wait below blocks past its deadline: a run that hangs fails its test, and the
    whole process group (loader workers included) is killed, instead of hanging the
    suite (a worker that outlived its run once held the output pipe open forever).
    """

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            # Unbuffered, so a line arrives when it is printed: block-buffered, the set-up
            # line came only at exit and a SIGTERM then hit a finished process.
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def text(self) -> str:
        return "".join(self.output)

    def wait_for_line(self, prefix: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no line starting {prefix!r} within {timeout} s:\n{self.text()}")
            if line is None:
                pytest.fail(f"the run ended before printing {prefix!r}:\n{self.text()}")
            if line.startswith(prefix):
                return

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """The exit status and all output, once the run and every process that shares
        its output (loader workers) have ended."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run was still going after {timeout} s:\n{self.text()}")
        self.reader.join(timeout=60)
        if self.reader.is_alive():
            self.kill()
            pytest.fail("a process of the run (a loader worker?) outlived it by 60 s, holding its "
                        f"output open:\n{self.text()}")
        return returncode, self.text()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_full_run_writes_every_artifact_and_eval_export_agree(data, tmp_path):
    run_dir = tmp_path / "run"
    summary = fit(tiny_config(data, run_dir, epochs=2, alpha=(2.0, 4.0), ema=True,
                              ema_decay=0.5, clip_grad=5.0))
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "tradeoff.png", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt", "base/model.safetensors",
                 "student/model.safetensors", "student_1/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    written = json.loads((run_dir / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for network in ("base", "student"):
        assert 0 <= summary[network]["top1"] <= summary[network]["top5"] <= 1
    assert [s["alpha"] for s in summary["students"]] == [2.0, 4.0]
    params = summary["params"]
    assert params["base"] > params["students"][0] > params["students"][1] > 0
    assert summary["flops"]["base"] > summary["flops"]["students"][0] > summary["flops"]["students"][1]
    rows = _metrics(run_dir)
    assert [row["epoch"] for row in rows] == [0, 1]
    # metrics.jsonl (read back from disk) ends with the row summary.json reports; evaluate()
    # itself is checked against hand counts and a float64 loss in test_evaluate.py.
    assert {key: rows[-1]["base"][key] for key in ("top1", "top5", "loss")} == pytest.approx(
        {key: summary["base"][key] for key in ("top1", "top5", "loss")})

    # eval of the last checkpoint reproduces the final epoch's numbers.
    metrics = evaluate_run(run_dir, checkpoint="last", device="cpu")
    assert json.loads((run_dir / "eval.json").read_text())["samples"] == 12
    for key in ("top1", "top5", "loss"):
        assert metrics["base"][key] == pytest.approx(rows[-1]["base"][key], rel=1e-5)
        assert metrics["students"][1][key] == pytest.approx(rows[-1]["students"][1][key], rel=1e-5)

    # export from the checkpoint: the reloaded student computes the adjoined student.
    shutil.rmtree(run_dir / "student")
    has_onnx = importlib.util.find_spec("onnx") is not None
    written = export_run(run_dir, checkpoint="last", onnx=has_onnx)
    assert (run_dir / "student" / "student.onnx").is_file() == has_onnx == ("onnx" in written)
    _, an, _ = load_run(run_dir, "last")
    student = anfast.load_student(run_dir / "student")
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(images), an(images).students[0], rtol=1e-4, atol=1e-5)


def test_epoch_rows_label_students_with_alpha_but_not_under_arch_config(tmp_path):
    """An --arch-config student has one alpha per width group: metrics.jsonl, TensorBoard,
    curves.png and the line that starts the steps must not label it with --alpha (which it
    never used), as summary.json says "alpha": null. Training.epoch_row on three images."""
    from types import SimpleNamespace

    from anfast.adjoin import AdjoinedOutput
    from anfast.runs.distributed import DistributedInfo
    from anfast.runs.records import plot_curves
    from anfast.train.loop import Training
    from anfast.train.state import RunState

    class Batches(list):
        skipped = 0

    class TwoStudents(torch.nn.Module):  # what evaluate reads of an adjoined network, at no cost
        def forward(self, images):
            logits = images.flatten(1)[:, :3]
            return AdjoinedOutput(logits, (logits, logits))

    an = TwoStudents()
    loader = Batches([(torch.randn(3, 3, 7, 7), torch.tensor([0, 1, 2]))])
    rows = {}
    for arch_config in (None, str(tmp_path / "arch.json")):
        run = SimpleNamespace(info=DistributedInfo(0, 0, 1, torch.device("cpu")), parts=SimpleNamespace(an=an),
                              eval_model=an, amp_dtype=None, schedule=SimpleNamespace(lr=lambda step: 0.1),
                              config=SimpleNamespace(alpha=(2.0, 4.0), arch_config=arch_config),
                              data=SimpleNamespace(train_loader=loader, val_loader=loader))
        rows[arch_config] = Training().epoch_row(run, RunState(epoch_seconds=1.0), 0.5, time.perf_counter())
        start = Training().describe(
            SimpleNamespace(arch="resnet18", **vars(run.config)), run.info,
            SimpleNamespace(train_loader=SimpleNamespace(classes=[0, 1, 2], num_samples=3, reason="torch")),
            SimpleNamespace(accum_steps=1, steps_per_epoch=1))
        assert start.startswith("anfast train: resnet18, widths arch.json, 3 classes" if arch_config
                                else "anfast train: resnet18, alpha 2,4, 3 classes"), start
    assert [student["alpha"] for student in rows[None]["students"]] == [2.0, 4.0]
    labelled = rows[str(tmp_path / "arch.json")]
    assert all("alpha" not in student for student in [labelled["student"], *labelled["students"]])
    plot_curves([labelled], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("workers, stops", [(0, (2, 3, 4)), (2, (4,))], ids=["in-process", "loader-workers"])
def test_resume_from_any_stop_equals_an_uninterrupted_run(data, tmp_path, workers, stops):
    # 24 images / batch 8 = 3 steps per epoch: stop mid-epoch 1, then after its last step
    # (before its evaluation), then after the first step of epoch 2, then run to the end.
    # With loader workers, the restart that begins in epoch 2 is the point: its fresh
    # workers' crops must follow from (seed, epoch, index) alone, not from what workers
    # drew in earlier epochs (each restart starts two worker processes).
    uninterrupted = tmp_path / "straight"
    fit(tiny_config(data, uninterrupted, epochs=2, workers=workers))
    resumed = tmp_path / "resumed"
    for stop_at in stops:
        result = fit(tiny_config(data, resumed, epochs=2, resume="auto", workers=workers),
                     should_stop=lambda step, stop_at=stop_at: step == stop_at)
        assert result["interrupted"] and result["step"] == stop_at
    fit(tiny_config(data, resumed, epochs=2, resume="auto", workers=workers))

    assert _without_timings(_metrics(resumed)) == _without_timings(_metrics(uninterrupted))
    straight = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    again = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert straight["model"].keys() == again["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, again["model"][name]), name


def test_a_stop_after_the_last_step_ends_the_run_or_is_reported_with_its_summary(data, tmp_path, monkeypatch,
                                                                                capsys):
    """A SIGTERM during the last epoch's evaluation (after its last step) stops the run
    there, and a resume only writes its end (the same metrics and weights as a run never
    stopped); one during the final exports leaves a whole run whose summary says a stop
    was asked for, so a program running it stops too. Both were once noticed by no one."""
    from anfast.train.loop import Training

    straight = tmp_path / "straight"
    fit(tiny_config(data, straight, epochs=1))
    real_epoch_row, real_finish = Training.epoch_row, Training.finish

    def terminated_during(method):
        def during(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # StopOnSignal's handler sets its flag
            return method(self, *args, **kwargs)
        return during

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Training, "epoch_row", terminated_during(real_epoch_row))
    result = fit(tiny_config(data, run_dir, epochs=1))
    assert result["interrupted"] and result["step"] == 3 and result["epoch"] == 1
    assert not (run_dir / "summary.json").exists()
    said = capsys.readouterr().out
    assert "stopped after epoch 1, step 3" in said, said
    # benchmarks/train_check.py (gpu_check's SIGTERM check) reads this line.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_check
    assert train_check.STOP_LINE.search(said)
    monkeypatch.setattr(Training, "epoch_row", real_epoch_row)
    summary = fit(tiny_config(data, run_dir, epochs=1, resume="auto"))
    assert "stop_requested" not in summary and (run_dir / "summary.json").is_file()
    assert _without_timings(_metrics(run_dir)) == _without_timings(_metrics(straight))
    expected = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    for name, tensor in load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"].items():
        assert torch.equal(tensor, expected[name]), name

    late = tmp_path / "late"
    monkeypatch.setattr(Training, "finish", terminated_during(real_finish))
    summary = fit(tiny_config(data, late, epochs=1))
    assert summary["stop_requested"] is True and (late / "summary.json").is_file()
    assert _without_timings(_metrics(late)) == _without_timings(_metrics(straight))


def test_gradient_accumulation_counts_optimizer_steps_and_resumes_exactly(data, tmp_path):
    # 24 images / batch 8 = 3 micro-batches per epoch; --accum-steps 2 makes 2 optimizer
    # steps of them (2 + the last 1). Stop after each step of epoch 1 and the first of
    # epoch 2: the resumed run must equal the uninterrupted one, weights bit for bit.
    uninterrupted = tmp_path / "straight"
    summary = fit(tiny_config(data, uninterrupted, epochs=2, accum_steps=2))
    assert summary["steps"] == 4 and summary["effective_batch_size"] == 16
    assert [row["step"] for row in _metrics(uninterrupted)] == [2, 4]
    resumed = tmp_path / "resumed"
    for stop_at in (1, 2, 3):
        result = fit(tiny_config(data, resumed, epochs=2, accum_steps=2, resume="auto"),
                     should_stop=lambda step, stop_at=stop_at: step == stop_at)
        assert result["interrupted"] and result["step"] == stop_at
        assert load_checkpoint(resumed / "checkpoints" / "last.pt")["batches_done"] == {1: 2, 2: 3, 3: 2}[stop_at]
    fit(tiny_config(data, resumed, epochs=2, accum_steps=2, resume="auto"))

    assert _without_timings(_metrics(resumed)) == _without_timings(_metrics(uninterrupted))
    straight = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    again = load_checkpoint(resumed / "checkpoints" / "last.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, again["model"][name]), name


def test_the_readme_resume_command_takes_the_runs_options_and_refuses_changed_ones(
        data, tmp_path, capsys, monkeypatch):
    # The README continues a run with `anfast train --out RUN --resume auto` alone: the run's
    # options must come from its checkpoint, not from the defaults (its 3 classes and 16 px
    # against the defaults' built-in set and 32 px). Changed options and other data are
    # refused in one line before anything runs; --overwrite with a bad option keeps the run.
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    fit(tiny_config(data, straight, epochs=2))
    result = fit(tiny_config(data, run_dir, epochs=2), should_stop=lambda step: step == 2)
    assert result["interrupted"]
    last = (run_dir / "checkpoints" / "last.pt").read_bytes()
    config = (run_dir / "config.yaml").read_text()

    def refused(*argv):
        assert anfast.cli.main(["train", "--out", str(run_dir), *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and (run_dir / "checkpoints" / "last.pt").read_bytes() == last
        assert (run_dir / "config.yaml").read_text() == config
        return lines[0]

    line = refused("--resume", "auto", "--epochs", "5", "--batch-size", "4")
    assert "but --epochs 5 (the run: 2); --batch-size 4 (the run: 8); leave these options out" in line
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog", "eel"))
    line = refused("--resume", "auto", "--data", str(other))
    assert f"the run was trained on classes ['ant', 'bee', 'cat'], {other} has ['cat', 'dog', 'eel']" in line
    line = refused("--overwrite", "--data", str(data), "--arch", "resnet81", "--image-size", "16",
                   "--batch-size", "8", "--loader", "torch", "--workers", "0", "--device", "cpu")
    assert "--arch 'resnet81' is not a torchvision model" in line

    # Stopped before its first evaluation, the run has no best.pt: eval says it read last.pt.
    evaluate_run(run_dir, device="cpu")
    assert json.loads((run_dir / "eval.json").read_text())["checkpoint"] == "last"

    monkeypatch.chdir(tmp_path)  # the run's paths hold from another working directory
    assert anfast.cli.main(["train", "--out", "run", "--resume", "auto"]) == 0
    assert _without_timings(_metrics(run_dir)) == _without_timings(_metrics(straight))
    assert json.loads((run_dir / "summary.json").read_text())["effective_batch_size"] == 8


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes(data, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "anfast", "train", *_cli_args(data, run_dir, epochs=2)]
    run = _Training(command)
    run.wait_for_line("anfast train: resnet18")  # set-up done, the loop starts now
    run.process.send_signal(signal.SIGTERM)
    returncode, output = run.finish()
    assert returncode == 0, output
    assert "stopped at epoch 1" in output and "--resume auto" in output, output
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and 1 <= state["step"] < 3

    assert anfast.cli.main([*command[3:], "--resume", "auto"]) == 0  # in this process: no start-up
    assert [row["epoch"] for row in _metrics(run_dir)] == [0, 1]
    assert (run_dir / "summary.json").is_file()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc: no tool from the PATH)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(data, tmp_path):
    # A batch scheduler signals every process of the job: loader workers included.
    run_dir = tmp_path / "run"
    args = _cli_args(data, run_dir, epochs=2)
    args[args.index("--workers") + 1] = "2"
    run = _Training([sys.executable, "-m", "anfast", "train", *args])
    run.wait_for_line("anfast train: resnet18")  # set-up done: the loop starts its workers
    pid = run.process.pid
    deadline = time.monotonic() + 120
    while len(_children(pid)) < 2 and run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_children(pid)) >= 2, "the loader workers never started"
    os.killpg(pid, signal.SIGTERM)
    returncode, output = run.finish()
    assert returncode == 0, output
    assert "killed by signal" not in output and "stopped at epoch 1" in output, output
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 0


def test_a_second_run_on_the_same_out_is_refused_and_a_finished_run_is_kept(data, tmp_path, capsys):
    # The first run is a process of its own; the others run in this one (no start-up).
    run_dir = tmp_path / "run"
    args = ["train", *_cli_args(data, run_dir, epochs=1)]
    first = _Training([sys.executable, "-m", "anfast", *args])
    first.wait_for_line("anfast train: resnet18")  # set-up done, the lock is held
    capsys.readouterr()
    line = _one_line(args, capsys)
    assert line.startswith(f"anfast train: error: --out {run_dir} is in use by another run "
                           f"(pid {first.process.pid} on "), line
    returncode, output = first.finish()
    assert returncode == 0, output
    metrics = (run_dir / "metrics.jsonl").read_text()
    checkpoint = (run_dir / "checkpoints" / "last.pt").read_bytes()

    line = _one_line(args, capsys)
    assert line.startswith(f"anfast train: error: --out {run_dir} already holds a run ("), line
    assert "continue it with --resume auto, or replace it with --overwrite" in line
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == checkpoint

    assert anfast.cli.main([*args, "--overwrite", "--seed", "1"]) == 0
    assert len(_metrics(run_dir)) == 1 and (run_dir / "metrics.jsonl").read_text() != metrics
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_unreadable_images_are_skipped_and_counted(data, tmp_path):
    broken = shutil.copytree(data, tmp_path / "broken")
    good = (broken / "train" / "ant" / "0.jpg").read_bytes()
    (broken / "train" / "ant" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (broken / "train" / "bee" / "readme.jpg").write_text("not an image\n")
    with pytest.warns(RuntimeWarning, match="skipped unreadable image"):
        # 26 files in batches of 13: drop_last drops none, so both bad files are read.
        summary = fit(tiny_config(broken, tmp_path / "run", epochs=1, batch_size=13))
    assert summary["skipped_images"] == 2
    assert _metrics(tmp_path / "run")[0]["skipped_images"] == 2


def test_non_finite_loss_stops_with_a_clear_error(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"^step \d+ \(epoch \d\): .*is not finite; .*"
                                                 r"Lower --lr") as error:
        fit(tiny_config(data, tmp_path / "run", epochs=2, lr=1e30, momentum=0.0))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    # The error names only a checkpoint that exists.
    if last.is_file():
        assert f"the last good checkpoint is {last}." in str(error.value)
    else:
        assert "no checkpoint has been written yet." in str(error.value)


_DRIVER = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    import anfast.train.loop as loop
    from anfast.train.config import TrainConfig
    config = TrainConfig.from_dict(json.loads(sys.argv[1]))
    # Each rank's own weights and BatchNorm statistics at every evaluation (the metrics
    # are all-reduced, so they agree across ranks whatever the model): DDP must have kept
    # the weights identical, and the statistics must be rank 0's, which last.pt keeps.
    sums, buffer_sums, evaluate = [], [], loop.evaluate
    def evaluate_and_sum(model, *args, **kwargs):
        sums.append(sum(float(p.double().sum()) for p in model.parameters()))
        buffer_sums.append(sum(float(b.double().sum()) for b in model.buffers() if b.is_floating_point()))
        return evaluate(model, *args, **kwargs)
    loop.evaluate = evaluate_and_sum
    # This rank's torch RNG state when the epoch's checkpoint was taken (nothing after it
    # in _end_epoch draws a random number).
    rng_at_checkpoint, end_epoch = [], loop._end_epoch
    def end_epoch_and_keep_rng(*args, **kwargs):
        end_epoch(*args, **kwargs)
        rng_at_checkpoint.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    loop._end_epoch = end_epoch_and_keep_rng
    summary = loop.fit(config)
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as file:
        json.dump({**summary, "weight_sums": sums, "buffer_sums": buffer_sums,
                   "rng_at_checkpoint": rng_at_checkpoint}, file)
""")


def test_torchrun_two_cpu_ranks_report_identical_final_metrics(data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    # Two micro-batches per step: ranks must all-reduce the accumulated gradients once
    # (DDP no_sync before the last micro-batch) and so stay identical. With --ema each
    # rank's EMA averages its own shard's BatchNorm statistics.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(2):  # gloo on CPU aborted once in eight tries on a 2-core machine
        # A run directory per attempt: a second run into a failed one's would be refused.
        run_dir = tmp_path / f"run{attempt}"
        config = tiny_config(data, run_dir, epochs=2, batch_size=4, accum_steps=2, ema=True,
                             ema_decay=0.5).to_dict()
        # The interpreter's own torchrun: a fresh machine has none on the PATH.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   "2", str(driver), json.dumps(config), str(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    for key in ("base", "student", "students", "steps", "skipped_images", "weight_sums", "buffer_sums"):
        assert rank0[key] == rank1[key], key
    assert len(rank0["weight_sums"]) == 2 and rank0["weight_sums"][0] != rank0["weight_sums"][1]
    # 12 train images per rank / batch 4 = 3 micro-batches: 2 steps (2 + 1) per epoch.
    assert rank0["steps"] == 4 and rank0["effective_batch_size"] == 16
    # val has 12 images over 2 shards: every image counted once, so top-1 is k/12.
    assert round(rank0["base"]["top1"] * 12, 6) == int(round(rank0["base"]["top1"] * 12))
    assert len(_metrics(run_dir)) == 2
    # The summary describes the saved EMA: eval of last.pt reproduces it.
    metrics = evaluate_run(run_dir, checkpoint="last", device="cpu")
    for evaluated, reported in ((metrics["base"], rank0["base"]), (metrics["students"][0], rank0["student"])):
        assert evaluated["top1"] == reported["top1"]
        assert evaluated["loss"] == pytest.approx(reported["loss"], rel=1e-5)

    # last.pt holds each rank's RNG states, as the rank held them, and a resume in another
    # number of processes is refused: it could not continue both ranks' random draws.
    last = run_dir / "checkpoints" / "last.pt"
    rng = load_checkpoint(last)["rng"]
    assert isinstance(rng, list) and len(rng) == 2
    for rank, saved in zip((0, 1), rng):
        digest = hashlib.sha256(saved["torch"].numpy().tobytes()).hexdigest()
        assert digest == (rank0, rank1)[rank]["rng_at_checkpoint"][-1], rank
    assert rank0["rng_at_checkpoint"][-1] != rank1["rng_at_checkpoint"][-1]
    with pytest.raises(ConfigError, match=rf"^--resume {re.escape(str(last))}: the run was trained with world size 2, "
                                          r"this process has world size 1; resume it with 2 processes "
                                          r"in all \(torchrun --nnodes x --nproc_per_node = 2\)$"):
        fit(tiny_config(data, run_dir, epochs=2, batch_size=4, accum_steps=2, ema=True, ema_decay=0.5,
                        resume=str(last)))


def _cli_args(data, run_dir, **overrides):
    config = tiny_config(data, run_dir, **overrides)
    return ["--data", config.data, "--out", config.out, "--arch", config.arch, "--alpha", "4",
            "--policy", config.policy, "--epochs", str(config.epochs), "--batch-size",
            str(config.batch_size), "--image-size", str(config.image_size), "--workers", "0",
            "--loader", "torch", "--lr", str(config.lr), "--warmup-epochs", "0",
            "--device", "cpu"]


def test_a_signal_reaches_every_enclosing_stop_handler():
    """fit's StopOnSignal inside a program's own (benchmarks/paper_table.py around each run):
    a SIGTERM during the run raises both flags, so the program stops after it even when
    the run itself finished (a search's last phase returns no interrupted summary)."""
    from anfast.train.loop import StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as outer:
        with StopOnSignal() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.requested and outer.requested
        with StopOnSignal() as later:  # a later run starts with its own flag down
            assert not later.requested
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back
