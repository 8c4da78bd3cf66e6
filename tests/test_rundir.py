"""Run directories: one process at a time, stale locks taken over, no run replaced by accident."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from anfast.train.config import ConfigError
from anfast.runs.rundir import LOCK_NAME, TRAIN_ARTIFACTS, RunDirLock, claim_run_dir

_HOLDER = textwrap.dedent("""
    import sys, time
    from anfast.runs.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _hold(run_dir):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_naming_the_holder_then_takes_over_after_kill_9(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        with pytest.raises(ConfigError, match=rf"--out {run_dir} is in use by another run \(pid "
                                              rf"{holder.pid} on .*, started .*\); wait for it"):
            claim_run_dir(run_dir, TRAIN_ARTIFACTS, resume=None, overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    # The dead holder's record is still in the file; the kernel has released its flock.
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = claim_run_dir(run_dir, TRAIN_ARTIFACTS, resume=None, overwrite=False)
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().err
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_release_lets_the_next_process_in_and_leaves_no_lock_file(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        (run_dir / "metrics.jsonl").write_text("{}\n")
        with pytest.raises(ConfigError, match="in use by another run"):
            RunDirLock(run_dir).acquire()  # flock is per open file, so this conflicts too
    assert not (run_dir / LOCK_NAME).exists()
    with RunDirLock(run_dir):
        pass
    empty = tmp_path / "empty"
    with RunDirLock(empty):
        pass
    assert not empty.exists()  # created by the lock and left empty: removed again


def test_a_run_directory_with_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    (run_dir / "student_1").mkdir()
    for name in ("metrics.jsonl", "summary.json", "notes.txt"):
        (run_dir / name).write_text("x")
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints, metrics.jsonl, "
                                          r"student_1, summary.json\); continue it with "
                                          r"--resume auto, or replace it with --overwrite"):
        claim_run_dir(run_dir, TRAIN_ARTIFACTS, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="replace it with --overwrite, or choose another --out"):
        claim_run_dir(run_dir, ("metrics.jsonl",), resume=None, overwrite=False)
    claim_run_dir(run_dir, TRAIN_ARTIFACTS, resume=True, overwrite=False).release()
    assert (run_dir / "summary.json").exists()
    # --overwrite deletes nothing until the new run's set-up has passed and it says so.
    claim_run_dir(run_dir, TRAIN_ARTIFACTS, resume=False, overwrite=True).release()
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == b"x"
    lock = claim_run_dir(run_dir, TRAIN_ARTIFACTS, resume=False, overwrite=True)
    lock.remove_previous_run()
    lock.release()
    # Only what anfast wrote is deleted.
    assert sorted(path.name for path in run_dir.iterdir()) == ["notes.txt"]


def test_an_unwritable_out_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"--out {blocker}/run: cannot write there"):
        RunDirLock(blocker / "run").acquire()
