"""``anfast tune``: measure auto's backend choice for every conv of a model, ahead of a run.

The model is the one ``anfast train`` builds with the same flags (anfast.cli.args:
the model flags default to TrainConfig's, so a bare ``anfast tune`` fills the cache a
bare ``anfast train`` reads); anfast.nn.backends records its problems and has each
verified and timed by anfast.ops.tuning.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Dict, List, Sequence

import torch

from anfast.cli.args import add_model_arguments, model_options
from anfast.data.builtin import SHAPES
from anfast.nn.backends import LayerDecision, tune_model
from anfast.ops import backend as registry, tuning
from anfast.ops.backend import ConvProblem
from anfast.runs.checkpoint import write_text_atomically
from anfast.runs.errors import ConfigError

__all__ = ["register", "format_table"]


def _shape(problem: ConvProblem) -> str:
    n, c, h, w = problem.x_base.shape
    kh, kw = problem.weight.shape[2:]
    return (f"{n}x{c}x{h}x{w}->{problem.weight.shape[0]} k{kh}x{kw}/s{problem.stride[0]}"
            f" (student {problem.in_student}->{problem.out_student})")


def format_table(rows: List[LayerDecision], candidates: Sequence[str]) -> str:
    """The per-layer table and the totals line that ``anfast tune`` prints."""
    header = (f"{'layer':<24}{'shape':<44}{'torch ms':>10}"
              + "".join(f"{name + ' ms':>11}" for name in candidates)
              + f"  {'choice':<8}{'speed-up':>9}  {'status':<7}verification")
    lines = [header, "-" * len(header)]
    for row in rows:
        results = row.decision.candidates
        times = "".join(f"{results[name].ms:>11.3f}" if name in results and results[name].ms is not None
                        else f"{'-':>11}" for name in candidates)
        checks = "; ".join(
            f"{name} verified (error {results[name].error:.1e})" if results[name].verified
            else f"{name} NOT verified: {results[name].why}" for name in candidates if name in results)
        lines.append(f"{row.layer:<24}{_shape(row.problem):<44}{row.decision.torch_ms:>10.3f}"
                     f"{times}  {row.decision.backend:<8}"
                     f"{row.decision.torch_ms / row.chosen_ms():>8.2f}x  "
                     f"{'cached' if row.cached else 'timed':<7}{checks}")
    lines.append(_totals_line(_totals(rows)))
    return "\n".join(lines)


def _totals(rows: List[LayerDecision]) -> Dict[str, Any]:
    torch_ms = sum(row.decision.torch_ms for row in rows)
    chosen_ms = sum(row.chosen_ms() for row in rows)
    keys = {tuning.problem_key(row.problem): row.cached for row in rows}
    return {"layers": len(rows), "problems": len(keys),
            "timed": sum(not cached for cached in keys.values()),
            "cached": sum(keys.values()), "torch_ms": torch_ms, "chosen_ms": chosen_ms,
            "speedup": torch_ms / chosen_ms if chosen_ms else 1.0,
            "choices": {name: sum(row.decision.backend == name for row in rows)
                        for name in sorted({row.decision.backend for row in rows})}}


def _totals_line(totals: Dict[str, Any]) -> str:
    choices = ", ".join(f"{name} {count}" for name, count in totals["choices"].items())
    return (f"total: {totals['layers']} layers, {totals['problems']} problems "
            f"({totals['timed']} timed, {totals['cached']} cached); fwd+bwd torch "
            f"{totals['torch_ms']:.3f} ms, chosen {totals['chosen_ms']:.3f} ms, speed-up "
            f"{totals['speedup']:.2f}x; choices: {choices}")


def _parse_backends(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--backends {text!r} names no backend; give a comma list of "
                          f"{','.join(registry.BACKEND_PRIORITY)}, e.g. triton,torch (or leave "
                          f"--backends out to try them all)")
    unknown = [name for name in names if name not in registry.BACKEND_PRIORITY]
    if unknown:
        raise ConfigError(f"--backends {text!r}: unknown backend(s) {unknown}; choose from "
                          f"{','.join(registry.BACKEND_PRIORITY)}")
    return [name for name in names if name != "torch"]


# The keys of every JSON `anfast tune --out` has written (_run's report; "complete" came later).
_TUNE_KEYS = ("model", "backends", "layers", "totals")


def _is_tune_result(path: pathlib.Path) -> bool:
    """Whether file ``path`` is a JSON object `anfast tune --out` wrote (_TUNE_KEYS)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and all(key in report for key in _TUNE_KEYS)


def _check_out(out: str) -> None:
    """Refuse an --out the tune JSON cannot be written to, or must not replace, before any
    layer is tuned: a folder, a path under a file, or a file that is not an earlier tune's
    JSON (a run's config.yaml, say). An earlier tune's JSON is replaced, as documented."""
    path = pathlib.Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the tune JSON's file path, e.g. "
                          f"--out {path / 'tune.json'}")
    parent = next((folder for folder in path.parents if folder.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if path.exists() and not _is_tune_result(path):
        raise ConfigError(f"--out {out} exists and is not a JSON `anfast tune` wrote; anfast tune "
                          f"replaces only an earlier tune's JSON: choose another --out, or move "
                          f"{out} away")


def _run(args: argparse.Namespace) -> int:
    from anfast.runs.distributed import resolve_device
    from anfast.train.build import create_adjoined_model, resolve_amp_dtype
    from anfast.train.config import TrainConfig

    candidates = _parse_backends(args.backends)
    if args.out:
        _check_out(args.out)
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes {args.num_classes} must be >= 1")
    config = TrainConfig.from_dict(model_options(args)).validate()
    device = resolve_device(config.device)
    amp_dtype = resolve_amp_dtype(config.amp, device)
    # As anfast.train.fit builds it: the network, on the device, then the memory format.
    model = create_adjoined_model(config, args.num_classes).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cache = tuning.cache_path(device)

    def write(rows: List[LayerDecision], complete: bool) -> None:
        report = {**tuning.device_identity(device), "versions": tuning.versions(),
                  "cache": str(cache), "model": config.to_dict(), "backends": candidates,
                  "complete": complete, "layers": [row.to_dict() for row in rows], "totals": _totals(rows)}
        write_text_atomically(args.out, json.dumps(report, indent=2) + "\n")

    # --out is rewritten as each layer is decided ("complete": false until the last), so a
    # tune cut short (a GPU lease's time limit) keeps its layers; the cache keeps them too.
    done: List[LayerDecision] = []

    def decided(row: LayerDecision) -> None:
        done.append(row)
        if args.out:
            write(done, complete=False)

    rows = tune_model(model, config.batch_size, config.image_size, amp_dtype, candidates,
                      explicit=True, force=args.force, layers=args.layers, on_row=decided)
    if not rows:
        raise ConfigError(f"--layers {args.layers!r} matches no adjoined conv of {config.arch}; "
                          f"`anfast info --arch {config.arch}` lists the layers")
    alpha = ",".join(f"{a:g}" for a in config.alpha)
    print(f"anfast tune: {config.arch}, alpha {alpha}, policy {config.policy}, batch "
          f"{config.batch_size}, {config.image_size} px, amp {config.amp}, "
          f"{'channels_last' if config.channels_last else 'NCHW'}, "
          f"{tuning.device_identity(device)['device']}; cache {cache}")
    print(format_table(rows, candidates))
    if args.out:
        write(rows, complete=True)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    """Add `anfast tune` to the main parser."""
    parser = subparsers.add_parser(
        "tune", help="verify and time the backends for every conv of a model; fill auto's cache",
        description="Build the adjoined model `anfast train` would with the same model flags (the "
                    "same defaults), record every adjoined conv problem of one training step, "
                    "verify each fused backend against torch (forward and every gradient) and time "
                    "forward+backward against torch. Decisions go to auto's cache "
                    "($ANFAST_CACHE_DIR, default ~/.cache/anfast); prints a per-layer table.")
    add_model_arguments(parser)
    parser.add_argument("--num-classes", type=int, default=len(SHAPES),
                        help="classifier outputs; no conv depends on them (default: %(default)s, the "
                             "built-in set's)")
    parser.add_argument("--backends", default=",".join(registry.BACKEND_PRIORITY),
                        help="backends to try against torch, e.g. triton,torch "
                             "(default: %(default)s)")
    parser.add_argument("--layers", default="*",
                        help="tune only the layers whose name matches this glob, e.g. 'layer1.*' "
                             "(default: all)")
    parser.add_argument("--force", action="store_true", help="re-time problems already cached")
    parser.add_argument("--out", help="also write the table as JSON here (rewritten as each layer "
                                      "is decided; its \"complete\" is true once every layer is); an earlier "
                                      "tune's JSON is replaced, any other file is refused")
    parser.set_defaults(func=_run)
