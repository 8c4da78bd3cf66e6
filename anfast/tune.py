"""``anfast tune``: measure auto's backend choice for every conv of a model, ahead of a run.

The model is the one ``anfast train`` builds (anfast.train.build.create_adjoined_model);
one forward pass at the run's batch size, image size, AMP dtype and memory format
records every problem the adjoined conv op meets (the backward pass meets the same
keys: a key includes which gradients are needed). Each problem is then verified and
timed by anfast.ops.tuning, which fills the cache that auto reads in training.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from anfast.nn import AdjoinedConv2d
from anfast.ops import backend as registry, dispatch, tuning
from anfast.ops.conv import TRACEABLE_BACKENDS
from anfast.ops.backend import ConvProblem

__all__ = ["register", "collect_layer_problems", "tune_model", "set_backend", "layer_backends",
           "prepare_backends", "pin_traceable_decisions", "LayerDecision", "format_table"]


def set_backend(model: torch.nn.Module, backend: str) -> None:
    """Run every adjoined conv of ``model`` on ``backend``; "auto" leaves the choice to
    $ANFAST_BACKEND, else auto."""
    for module in model.modules():
        if isinstance(module, AdjoinedConv2d):
            module.backend = None if backend == "auto" else backend


def _example_batch(model: torch.nn.Module, batch_size: int, image_size: int) -> torch.Tensor:
    weight = next(p for p in model.parameters() if p.dim() == 4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=weight.device)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def collect_layer_problems(model: torch.nn.Module, batch_size: int, image_size: int,
                           amp_dtype: Optional[torch.dtype]) -> List[tuple[str, ConvProblem, str]]:
    """(layer name, problem, backend that ran it) of every adjoined conv call of one
    forward pass on random images shaped like the run's batches.

    The model runs in eval mode (BatchNorm statistics stay untouched) with gradients
    enabled, so each problem's key says which gradients training needs. A conv module
    with several fused passes (nested students) names them ``layer#1``, ``layer#2``.
    """
    images = _example_batch(model, batch_size, image_size)
    named: List[tuple[str, ConvProblem, str]] = []
    first_record: Dict[str, int] = {}

    def label(name):
        def pre_hook(module, args):
            first_record[name] = len(records)

        def hook(module, args, output):
            calls = [r for r in records[first_record[name]:] if r[1] == "forward"]
            for index, (problem, _, backend) in enumerate(calls):
                named.append((name if len(calls) == 1 else f"{name}#{index + 1}", problem, backend))
        return pre_hook, hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, AdjoinedConv2d):
            pre_hook, hook = label(name)
            handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]
    was_training = model.training
    model.eval()
    try:
        with dispatch.recording() as records, torch.autocast(
                images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return named


@dataclass
class LayerDecision:
    """One row of the tune table."""

    layer: str
    problem: ConvProblem
    decision: Dict[str, Any]
    cached: bool

    def chosen_ms(self) -> float:
        choice = self.decision["backend"]
        return self.decision["torch_ms"] if choice == "torch" else \
            self.decision["candidates"][choice]["ms"]

    def to_dict(self) -> Dict[str, Any]:
        p = self.problem
        return {"layer": self.layer, "key": tuning.problem_key(p),
                "x_base": list(p.x_base.shape), "x_student": list(p.x_student.shape),
                "weight": list(p.weight.shape), "out_student": p.out_student,
                "stride": list(p.stride), "padding": list(p.padding),
                "choice": self.decision["backend"], "variant": self.decision["variant"],
                "reason": self.decision["reason"],
                "torch_ms": self.decision["torch_ms"], "chosen_ms": self.chosen_ms(),
                "speedup": self.decision["torch_ms"] / self.chosen_ms(),
                "candidates": self.decision["candidates"], "cached": self.cached}


def tune_model(model: torch.nn.Module, batch_size: int, image_size: int,
               amp_dtype: Optional[torch.dtype], candidates: Optional[Sequence[str]] = None,
               explicit: bool = False, force: bool = False, layers: str = "*"
               ) -> List[LayerDecision]:
    """Decide auto's backend for every adjoined conv of ``model`` at this batch shape
    (those whose name matches the glob ``layers``).

    A collective in a distributed run (every rank calls it; all get rank 0's decisions).
    """
    layers = [layer for layer in collect_layer_problems(model, batch_size, image_size, amp_dtype)
              if fnmatch.fnmatchcase(layer[0], layers)]
    results = tuning.tune_problems([problem for _, problem, _ in layers], candidates, explicit,
                                   force)
    return [LayerDecision(name, problem, decision, cached)
            for (name, problem, _), (decision, cached) in zip(layers, results)]


def layer_backends(model: torch.nn.Module, batch_size: int, image_size: int,
                   amp_dtype: Optional[torch.dtype]) -> Dict[str, str]:
    """{layer: backend} that each adjoined conv of ``model`` runs at this batch shape now."""
    return {name: backend for name, _, backend in
            collect_layer_problems(model, batch_size, image_size, amp_dtype)}


def prepare_backends(model: torch.nn.Module, backend: str, batch_size: int, image_size: int,
                     amp_dtype: Optional[torch.dtype]) -> None:
    """What `anfast train` does before its first step: set every layer's backend and,
    for auto on a GPU, tune the model's problems now (a collective under torchrun), so
    the ranks agree and the first epoch's throughput does not include the tuning."""
    set_backend(model, backend)
    device = next(model.parameters()).device
    if backend == "auto" and device.type in tuning.get_tuner().lazy_devices:
        pin_traceable_decisions(model, tune_model(model, batch_size, image_size, amp_dtype))


def pin_traceable_decisions(model: torch.nn.Module, decisions: Sequence["LayerDecision"]) -> List[str]:
    """Fix the backend of every adjoined conv whose passes auto decided alike for a backend
    with a traceable form (torch: aten convolutions), so torch.compile and CUDA graphs see
    plain aten ops there instead of the custom op that would decide again on every call
    (DESIGN.md section 4c, decide then trace). Returns the names of the pinned layers."""
    chosen: Dict[str, set] = {}
    for row in decisions:
        chosen.setdefault(row.layer.split("#")[0], set()).add(row.decision["backend"])
    pinned = []
    for name, module in model.named_modules():
        names = chosen.get(name, set())
        if isinstance(module, AdjoinedConv2d) and len(names) == 1 and names <= TRACEABLE_BACKENDS.keys():
            module.backend = next(iter(names))
            pinned.append(name)
    return pinned


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
        results = row.decision["candidates"]
        times = "".join(f"{results[name]['ms']:>11.3f}" if results.get(name, {}).get("ms") is not None
                        else f"{'-':>11}" for name in candidates)
        checks = "; ".join(
            f"{name} verified (error {results[name]['error']:.1e})" if results[name]["verified"]
            else f"{name} NOT verified: {results[name]['why']}" for name in candidates if name in results)
        lines.append(f"{row.layer:<24}{_shape(row.problem):<44}{row.decision['torch_ms']:>10.3f}"
                     f"{times}  {row.decision['backend']:<8}"
                     f"{row.decision['torch_ms'] / row.chosen_ms():>8.2f}x  "
                     f"{'cached' if row.cached else 'timed':<7}{checks}")
    lines.append(_totals_line(_totals(rows)))
    return "\n".join(lines)


def _totals(rows: List[LayerDecision]) -> Dict[str, Any]:
    torch_ms = sum(row.decision["torch_ms"] for row in rows)
    chosen_ms = sum(row.chosen_ms() for row in rows)
    keys = {tuning.problem_key(row.problem): row.cached for row in rows}
    return {"layers": len(rows), "problems": len(keys),
            "timed": sum(not cached for cached in keys.values()),
            "cached": sum(keys.values()), "torch_ms": torch_ms, "chosen_ms": chosen_ms,
            "speedup": torch_ms / chosen_ms if chosen_ms else 1.0,
            "choices": {name: sum(row.decision["backend"] == name for row in rows)
                        for name in sorted({row.decision["backend"] for row in rows})}}


def _totals_line(totals: Dict[str, Any]) -> str:
    choices = ", ".join(f"{name} {count}" for name, count in totals["choices"].items())
    return (f"total: {totals['layers']} layers, {totals['problems']} problems "
            f"({totals['timed']} timed, {totals['cached']} cached); fwd+bwd torch "
            f"{totals['torch_ms']:.3f} ms, chosen {totals['chosen_ms']:.3f} ms, speed-up "
            f"{totals['speedup']:.2f}x; choices: {choices}")


def _parse_backends(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in registry.BACKEND_PRIORITY]
    if unknown or not names:
        raise ValueError(f"--backends {text!r}: unknown backend(s) {unknown}; choose from "
                         f"{','.join(registry.BACKEND_PRIORITY)}")
    return [name for name in names if name != "torch"]


def _run(args: argparse.Namespace) -> int:
    from anfast.train.build import create_adjoined_model, resolve_amp_dtype
    from anfast.train.config import ConfigError, TrainConfig, parse_alpha
    from anfast.train.distributed import resolve_device

    try:
        candidates = _parse_backends(args.backends)
        device = resolve_device(args.device)
        config = TrainConfig(arch=args.arch, alpha=parse_alpha(args.alpha), policy=args.policy,
                             batch_size=args.batch_size, image_size=args.image_size, amp=args.amp,
                             channels_last=args.channels_last, device=str(device)).validate()
        amp_dtype = resolve_amp_dtype(config.amp, device)
        model = create_adjoined_model(config, args.num_classes).to(device)
    except (ValueError, ConfigError) as error:
        print(f"anfast tune: error: {error}", file=sys.stderr)
        return 2
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rows = tune_model(model, config.batch_size, config.image_size, amp_dtype, candidates,
                      explicit=True, force=args.force, layers=args.layers)
    if not rows:
        print(f"anfast tune: error: --layers {args.layers!r} matches no adjoined conv of "
              f"{config.arch}; `anfast info --arch {config.arch}` lists the layers", file=sys.stderr)
        return 2
    cache = tuning.cache_path(device)
    print(f"anfast tune: {config.arch}, alpha {args.alpha}, policy {config.policy}, batch "
          f"{config.batch_size}, {config.image_size} px, amp {config.amp}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, "
          f"{tuning.device_identity(device)['device']}; cache {cache}")
    print(format_table(rows, candidates))
    if args.out:
        report = {**tuning.device_identity(device), "versions": tuning.versions(),
                  "cache": str(cache), "model": config.to_dict(), "backends": candidates,
                  "layers": [row.to_dict() for row in rows], "totals": _totals(rows)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    """Add `anfast tune` to the main parser."""
    from anfast.train.config import POLICY_CHOICES

    parser = subparsers.add_parser(
        "tune", help="verify and time the backends for every conv of a model; fill auto's cache",
        description="Build the adjoined model `anfast train` would, record every adjoined conv "
                    "problem of one training step, verify each fused backend against torch "
                    "(forward and every gradient) and time forward+backward against torch. "
                    "Decisions go to auto's cache ($ANFAST_CACHE_DIR, default ~/.cache/anfast); "
                    "prints a per-layer table.")
    parser.add_argument("--arch", default="resnet50", help="model name, as for `anfast train`")
    parser.add_argument("--alpha", default="4", help="student width divisor(s), e.g. 4 or 2,4")
    parser.add_argument("--policy", default="paper", choices=POLICY_CHOICES)
    parser.add_argument("--batch-size", type=int, default=256, help="per process, as in training")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--backends", default=",".join(registry.BACKEND_PRIORITY),
                        help="backends to try against torch, e.g. triton,torch "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: auto)")
    parser.add_argument("--layers", default="*",
                        help="tune only the layers whose name matches this glob, e.g. 'layer1.*' "
                             "(default: all)")
    parser.add_argument("--force", action="store_true", help="re-time problems already cached")
    parser.add_argument("--out", help="also write the table as JSON here")
    parser.set_defaults(func=_run)
