"""Does `anfast train` reach its accuracy band on this device, and resume after SIGTERM?

Question (issue: measure everything on a GPU, step e): the quickstart's training on the
built-in dataset, run twice at the same time on one device:

  uninterrupted  `anfast train --epochs E` to the end;
  resumed        the same run, sent SIGTERM once its first checkpoint exists (so it
                 stops mid-way through epoch 2 and saves), then `--resume auto` to the end.

Both must exit 0, the first part of the resumed run must report that it stopped, and
both final top-1s are recorded next to the device, versions and commit. On CUDA the
convolutions are not bit-deterministic, so the resumed run's accuracy is compared with
the uninterrupted one's rather than required to equal it (the CPU tests check exact
resumes). Extra arguments go to both `anfast train` runs:

    python benchmarks/train_check.py --device cuda --out OUT -- --amp bf16 --channels-last
    python benchmarks/train_check.py --device cpu                  # the CPU reference band

Writes OUT/train_check.json, or benchmarks/results/train_check-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

# What `anfast train` prints when a stop request ended it (anfast.train.loop._save_stopped_run).
STOP_LINE = re.compile(r"stopped (at|after) epoch \d+")


def train_command(run_dir: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """`anfast train` through this interpreter (never a tool found on the PATH)."""
    return [sys.executable, "-m", "anfast", "train", "--out", str(run_dir), "--epochs",
            str(args.epochs), "--device", args.device, "--workers", str(args.workers),
            *args.train_args, *extra]


def finished(run_dir: Path, seconds: float, log: str) -> dict:
    """The final top-1s of a completed run, read from its summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"base_top1": summary["base"]["top1"], "student_top1": summary["student"]["top1"],
            "wall_s": round(seconds, 1), "log_tail": log[-400:]}


def start_uninterrupted(run_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, float]:
    """Start the uninterrupted run (it trains while the other run is stopped and resumed)."""
    with open(run_dir.parent / "uninterrupted.log", "w") as log:  # the child keeps its own copy
        process = subprocess.Popen(train_command(run_dir, args), stdout=log, stderr=subprocess.STDOUT)
    return process, time.perf_counter()


def finish_uninterrupted(run_dir: Path, started: tuple[subprocess.Popen, float]) -> dict:
    process, start = started
    process.wait()
    log = (run_dir.parent / "uninterrupted.log").read_text()
    if process.returncode != 0:
        raise SystemExit(f"train_check: the uninterrupted run exited {process.returncode}:\n{log[-4000:]}")
    return finished(run_dir, time.perf_counter() - start, log)


def run_stopped_and_resumed(run_dir: Path, args: argparse.Namespace) -> dict:
    """SIGTERM as soon as checkpoints/last.pt exists, then --resume auto to the end."""
    start = time.perf_counter()
    first = subprocess.Popen(train_command(run_dir, args), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.pt"
    while first.poll() is None and not last.exists():
        time.sleep(0.2)
    if first.poll() is None:
        first.send_signal(signal.SIGTERM)
    first_log, _ = first.communicate()
    if first.returncode != 0:
        raise SystemExit(f"train_check: the run sent SIGTERM exited {first.returncode} (expected 0 "
                         f"after saving):\n{first_log[-2000:]}")
    # fit's line for a stop mid-epoch ("stopped at epoch N") or at an epoch's end ("after").
    stopped = STOP_LINE.search(first_log) is not None
    second = subprocess.run(train_command(run_dir, args, "--resume", "auto"), capture_output=True,
                            text=True)
    if second.returncode != 0:
        raise SystemExit(f"train_check: the resumed run exited {second.returncode}:\n"
                         f"{second.stdout[-2000:]}{second.stderr[-2000:]}")
    result = finished(run_dir, time.perf_counter() - start, second.stdout + second.stderr)
    result["stopped_by_sigterm"] = stopped
    result["stop_message"] = next((line for line in first_log.splitlines()
                                   if STOP_LINE.search(line)), None)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for train_check.json and the two run directories "
                             "(default: a temporary directory and benchmarks/results/)")
    parser.add_argument("train_args", nargs="*", help="after --: more `anfast train` options")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="anfast-train-check-"))
    work.mkdir(parents=True, exist_ok=True)
    # The two runs go side by side (one device is enough for both at this size).
    uninterrupted = start_uninterrupted(work / "uninterrupted", args)
    try:
        resumed = run_stopped_and_resumed(work / "resumed", args)
    except BaseException:
        uninterrupted[0].kill()
        raise
    runs = {"uninterrupted": finish_uninterrupted(work / "uninterrupted", uninterrupted),
            "resumed": resumed}
    payload = {
        **environment(args.device),
        "question": "anfast train on the built-in set: final top-1, and a run stopped by SIGTERM "
                    "then resumed with --resume auto",
        "epochs": args.epochs, "train_args": args.train_args, "runs": runs,
        "resumed_minus_uninterrupted_student_top1":
            runs["resumed"]["student_top1"] - runs["uninterrupted"]["student_top1"],
    }
    path = write_result("train_check", payload, args.out / "train_check.json" if args.out else None)
    for name, run in runs.items():
        print(f"{name:14s} base top-1 {100 * run['base_top1']:.1f}%  student top-1 "
              f"{100 * run['student_top1']:.1f}%  {run['wall_s']:.0f} s")
    print(f"stopped by SIGTERM and resumed: {runs['resumed']['stopped_by_sigterm']}; wrote {path}")
    return 0 if runs["resumed"]["stopped_by_sigterm"] else 1


if __name__ == "__main__":
    sys.exit(main())
