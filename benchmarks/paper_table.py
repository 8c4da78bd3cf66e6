"""The paper's comparison on any dataset: AN against the student alone, distillation and the plain base.

Question: on this data, does the Adjoined Networks student beat the same small network
trained alone and classic distillation from a trained base, and is the AN base no worse
than the plain base? Every row is one `anfast.train.loop.fit` run with the same epochs,
optimizer, schedule, augmentation and seed; only TrainConfig.objective / teacher differ:

- base:      --objective base: cross-entropy on the base only (the students get no gradient),
             so the exported base is a plain network trained alone;
- scratch:   --objective student: cross-entropy on the student only; its export is exactly
             the network export_student gives (its slice of the base's weights trains, the
             rest is never used by it). Its initial weights are the base's slice;
- distilled: scratch's objective plus --teacher the same seed's trained plain base
             (Hinton et al. 2015: T = 4, weight 0.9 on the soft term, the values of that
             paper's common use; --temperature / --distill-weight change them);
- adjoined:  the paper's AN loss and lambda schedule (`anfast train`'s defaults);
- dan:       `anfast search` with the same seed, epochs, batch and image size, its FLOPs
             target the same seed's AN student's fraction of the base, then AN training
             of the derived widths (`--arch-config arch.json`): the row is that student.

Top-1 is the val top-1 after the last epoch, mean and sample standard deviation over
--seeds. Writes benchmarks/results/paper_table-<machine>-<date>.json (common.write_result)
and the plot (top-1 against FLOPs, error bars) next to it as .png.

The runs go to --work (default: a temporary folder, removed at the end); a --work that
already holds runs of the table is refused unless --overwrite replaces them. An option
that cannot work is one line on stderr and exit status 2 (`anfast`'s error printer,
anfast.cli.user_error); SIGTERM / SIGINT ends the running row with its checkpoint and
stops the script with one line naming the row, exit status 1, the table not written.

    python benchmarks/paper_table.py                          # built-in set, 3 seeds
    python benchmarks/paper_table.py --data /imagenette --arch resnet18 --epochs 20
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import environment, write_result  # noqa: E402

from anfast.cli import user_error  # noqa: E402
from anfast.dan.search import SearchConfig, search, search_training  # noqa: E402
from anfast.runs.errors import ConfigError, RunStoppedError  # noqa: E402
from anfast.runs.rundir import SEARCH_ARTIFACTS, TRAIN_ARTIFACTS  # noqa: E402
from anfast.train.config import POLICY_CHOICES, TrainConfig, parse_alpha  # noqa: E402
from anfast.train.loop import StopOnSignal, fit  # noqa: E402

ROWS = ("base", "scratch", "distilled", "adjoined", "dan")


def row_config(name: str, common: TrainConfig, seed: int, work: pathlib.Path) -> TrainConfig:
    """The TrainConfig of row ``name`` for ``seed``; the distilled row's teacher is the same
    seed's base run, the dan row's widths the same seed's search (both run first)."""
    objective = {"base": "base", "scratch": "student", "distilled": "student", "adjoined": "adjoined",
                 "dan": "adjoined"}[name]
    teacher = str(work / f"base-{seed}" / "base") if name == "distilled" else None
    arch_config = str(search_dir(work, seed) / "arch.json") if name == "dan" else common.arch_config
    return dataclasses.replace(common, objective=objective, teacher=teacher, arch_config=arch_config,
                               seed=seed, out=str(work / f"{name}-{seed}"))


def search_dir(work: pathlib.Path, seed: int) -> pathlib.Path:
    return work / f"dan-search-{seed}"


def search_config(common: TrainConfig, seed: int, work: pathlib.Path, target_flops: float) -> SearchConfig:
    """`anfast search` for the dan row: the table's data, network, batch, image size, epochs,
    seed and --overwrite, toward ``target_flops`` (a fraction of the base's)."""
    return SearchConfig(target_flops=target_flops, train=search_training(
        data=common.data, arch=common.arch, round_to=common.round_to, image_size=common.image_size,
        batch_size=common.batch_size, epochs=common.epochs, seed=seed, device=common.device,
        workers=common.workers, out=str(search_dir(work, seed)), overwrite=common.overwrite))


def refuse_previous_runs(work: pathlib.Path, seeds: int) -> None:
    """Refuse a --work whose row or search folders already hold a run: the table would
    replace it (rundir.claim_run_dir refuses each folder too, but names --out and comes
    only when the table reaches that row)."""
    folders = [work / f"{name}-{seed}" for seed in range(seeds) for name in ROWS]
    folders += [search_dir(work, seed) for seed in range(seeds)]
    held = [folder.name for folder in folders
            if any(any(folder.glob(pattern)) for pattern in {*TRAIN_ARTIFACTS, *SEARCH_ARTIFACTS})]
    if held:
        raise ConfigError(f"--work {work} already holds runs ({', '.join(held[:4])}"
                          f"{', ...' if len(held) > 4 else ''}); replace them with --overwrite, "
                          f"or choose another --work")


def row_result(name: str, summary: Dict) -> Dict[str, float]:
    """The trained network of row ``name`` in a fit summary: the base for base, else the
    student; the adjoined row also keeps its base's top-1 (the paper's regularised base)."""
    side = "base" if name == "base" else "student"
    result = {"top1": summary[side]["top1"], "params": summary["params"][side],
              "flops": summary["flops"][side]}
    if name == "adjoined":
        result["base_top1"], result["base_flops"] = summary["base"]["top1"], summary["flops"]["base"]
    return result


def train_row(name: str, common: TrainConfig, seed: int, work: pathlib.Path,
              runs: Dict[str, List[Dict[str, float]]]) -> Dict:
    """fit's summary of row ``name`` for ``seed``; the dan row searches first, at the FLOPs of
    this seed's AN student, and a stop request during its search returns the search's
    ``{"interrupted": True, ...}``."""
    if name == "dan":
        adjoined = runs["adjoined"][-1]
        searched = search(search_config(common, seed, work, adjoined["flops"] / adjoined["base_flops"]))
        if isinstance(searched, dict):
            return searched
    return fit(row_config(name, common, seed, work))


def run_table(common: TrainConfig, seeds: int, work: pathlib.Path) -> Dict[str, Dict]:
    """Train every row for every seed; one stdout line per finished run. A stop request
    (SIGTERM / SIGINT: fit saves the running row's checkpoint; between two runs, the
    StopOnSignal here) raises RunStoppedError naming the row, before the next one starts."""
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in ROWS}
    with StopOnSignal() as stop_signal:
        for seed in range(seeds):
            for name in ROWS:
                started = time.perf_counter()
                summary = train_row(name, common, seed, work, runs)
                # A signal during a run raises this flag too (StopOnSignal nests), whether the
                # run stopped (interrupted) or had passed its last step.
                if stop_signal.requested:
                    raise RunStoppedError(f"stopped (SIGTERM / SIGINT) during row {name} seed {seed}; "
                                          f"nothing of the table was written")
                result = row_result(name, summary)
                runs[name].append(result)
                print(f"paper_table: {name} seed {seed}: top-1 {100 * result['top1']:.2f}% "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    rows = {}
    for name, results in runs.items():
        top1 = [r["top1"] for r in results]
        rows[name] = {"top1_mean": statistics.fmean(top1),
                      "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                      "top1": top1, "params": results[0]["params"], "flops": results[0]["flops"]}
        if name == "dan":  # each seed's search derives its own widths
            rows[name].update(params=statistics.fmean(r["params"] for r in results),
                              flops=statistics.fmean(r["flops"] for r in results),
                              params_per_seed=[r["params"] for r in results],
                              flops_per_seed=[r["flops"] for r in results])
        if name == "adjoined":
            base_top1 = [r["base_top1"] for r in results]
            rows[name].update(base_top1_mean=statistics.fmean(base_top1),
                              base_top1_std=statistics.stdev(base_top1) if len(base_top1) > 1 else 0.0,
                              base_top1=base_top1)
    return rows


def plot_rows(rows: Dict[str, Dict], path: pathlib.Path, title: str) -> None:
    """Top-1 against FLOPs, one marker per method, error bars one standard deviation."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for (name, row), marker in zip(((n, r) for n, r in rows.items() if "top1_mean" in r), "osD^v"):
        axes.errorbar(row["flops"] / 1e6, 100 * row["top1_mean"], yerr=100 * row["top1_std"],
                      marker=marker, capsize=4, linestyle="none", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("MFLOPs per image")
    axes.set_ylabel("val top-1 (%)")
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> pathlib.Path:
    """Run the table and return the JSON's path. An error the user can fix (anfast.cli.user_error)
    prints one line and exits with status 2, a stopped run (RunStoppedError) with 1, as `anfast`
    does; any other is a bug and keeps its traceback."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--data", help="ImageFolder root (train/, val/); default: the built-in set")
    parser.add_argument("--arch", default=defaults.arch)
    parser.add_argument("--alpha", default="4", help="the student's width divisor (one student)")
    parser.add_argument("--policy", choices=POLICY_CHOICES, default=defaults.policy)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--temperature", type=float, default=defaults.distill_temperature)
    parser.add_argument("--distill-weight", type=float, default=defaults.distill_weight)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs a --work already holds")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/paper_table-<machine>-<date>.json)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    try:
        return write_table(args, parser, argv)
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        print(f"paper_table: error: {message}", file=sys.stderr)
        raise SystemExit(1 if isinstance(error, RunStoppedError) else 2) from None


def write_table(args: argparse.Namespace, parser: argparse.ArgumentParser,
                argv: Optional[List[str]]) -> pathlib.Path:
    """Train the rows of ``args`` and write the table's JSON and plot; returns the JSON's path."""
    alpha = parse_alpha(args.alpha)
    if len(alpha) != 1:
        parser.error(f"--alpha {args.alpha}: the table compares one student; give one divisor")
    common = TrainConfig(data=args.data, arch=args.arch, alpha=alpha, policy=args.policy,
                         epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                         distill_temperature=args.temperature, distill_weight=args.distill_weight,
                         device="cpu", workers=0, overwrite=args.overwrite).validate()
    if args.work and not args.overwrite:
        refuse_previous_runs(pathlib.Path(args.work), args.seeds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paper_table-") as scratch_dir:
        rows = run_table(common, args.seeds, pathlib.Path(args.work or scratch_dir))
    payload = {**environment("cpu"), "benchmark": "paper_table", "wall_time_s": time.perf_counter() - started,
               "command": " ".join(["python", "benchmarks/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
               "data": args.data or "built-in", "arch": args.arch, "alpha": alpha[0], "policy": args.policy,
               "epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size,
               "seeds": args.seeds, "temperature": args.temperature, "distill_weight": args.distill_weight,
               "rows": rows}
    path = write_result("paper_table", payload, args.out)
    plot_rows(rows, path.with_suffix(".png"),
              f"{args.arch}, alpha {alpha[0]:g}, {args.epochs} epochs, {args.seeds} seed(s), "
              f"{payload['data']}")
    for name, row in rows.items():
        if "top1_mean" in row:
            print(f"{name:10s} top-1 {100 * row['top1_mean']:6.2f} +- {100 * row['top1_std']:.2f}%  "
                  f"params {row['params']:,}  MFLOPs {row['flops'] / 1e6:.1f}")
    print(f"paper_table: wrote {path} and {path.with_suffix('.png')} in {payload['wall_time_s']:.0f} s")
    return path


if __name__ == "__main__":
    main()
