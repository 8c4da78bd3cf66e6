"""`anfast search`: the argparse front end of anfast.dan.search.

``register(subparsers)`` adds the command to the main ``anfast`` parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from anfast.dan.search import OPTIMIZERS, TAU_SCHEDULES, SearchConfig, search

__all__ = ["register", "config_from_args"]

_DEFAULTS = SearchConfig()


def _choices(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a comma list of numbers such as 1,2,4,8") from None


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``search`` to an ``add_subparsers()`` object; returns its parser."""
    parser = subparsers.add_parser(
        "search", help="DAN: search per-width-group alphas toward a FLOPs / params target",
        description="Differentiable Adjoined Network search: learn one width per width group so the "
                    "student meets a FLOPs or parameter target, then write RUN_DIR/arch.json for "
                    "`anfast train --arch-config RUN_DIR/arch.json`.")
    add = parser.add_argument
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="student FLOPs as a fraction of the base's, e.g. 0.4")
    target.add_argument("--target-params", type=float, help="student parameters as a fraction of the base's")
    add("--data", help="folder with train/<class>/*.jpg (default: the built-in shapes set)")
    add("--arch", default=_DEFAULTS.arch, help="torchvision name, xresnet18/34/50/101, or timm:NAME (default: %(default)s)")
    add("--choices", type=_choices, default=_DEFAULTS.choices,
        help="width divisors each group chooses from (default: 1,2,4,8)")
    for name, help_text in (
        ("round_to", "student widths round up to this"),
        ("gamma", "weight of the resource penalty"),
        ("tau0", "first Gumbel-softmax temperature (unset: 15 for --tau-schedule paper, 1 for anneal)"),
        ("tau_decay", "temperature factor per epoch, --tau-schedule paper"),
        ("tau_end", "last step's temperature, --tau-schedule anneal"),
        ("epochs", None), ("max_steps_per_epoch", "cap on steps per epoch"),
        ("batch_size", None), ("image_size", "crop size in pixels"),
        ("lr", "network weight learning rate (cosine schedule)"), ("momentum", "--optimizer sgd only"),
        ("weight_decay", None), ("arch_lr", "architecture logit learning rate (Adam)"),
        ("arch_weight_decay", None),
        ("arch_warmup", "fraction of the steps that train only the weights before the logits move"),
        ("workers", "loader worker processes"), ("seed", None),
    ):
        default = getattr(_DEFAULTS, name)
        kind = int if isinstance(default, int) or name == "max_steps_per_epoch" else float
        add("--" + name.replace("_", "-"), type=kind, default=default,
            help=f"{help_text + ' ' if help_text else ''}(default: %(default)s)")
    add("--optimizer", default=_DEFAULTS.optimizer, choices=OPTIMIZERS,
        help="network weight optimizer (default: %(default)s)")
    add("--tau-schedule", default=_DEFAULTS.tau_schedule, choices=TAU_SCHEDULES,
        help="paper: tau0 * tau_decay^epoch; anneal: tau0 to tau_end geometrically over the search's "
             "steps; auto: paper from 50 epochs up, else anneal (default: %(default)s)")
    add("--lambda-schedule", default=_DEFAULTS.lambda_schedule, choices=("paper", "linear", "constant"),
        help="weight of KL + gamma * R over the search (default: %(default)s)")
    add("--frozen-noise", action="store_true", help="keep one Gumbel noise draw for the whole search (the paper)")
    add("--pretrained", help="start the network from a local checkpoint: .safetensors, a torchvision / timm "
                             ".pt/.pth state_dict, or an anfast export folder (RUN_DIR/base)")
    add("--pretrained-skip-classifier", action="store_true",
        help="keep a fresh classifier (a checkpoint with another number of classes)")
    add("--device", default=_DEFAULTS.device, help="cpu, cuda or cuda:N (default: %(default)s)")
    add("--out", default=_DEFAULTS.out, help="run directory (default: %(default)s)")
    add("--overwrite", action="store_true", help="replace a search already in --out")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The SearchConfig the parsed flags describe."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig) if hasattr(args, f.name)}
    return SearchConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Run the search; print where the arch and the plot went. Returns the exit code."""
    try:
        result = search(config_from_args(args))  # user errors: one line on stderr, by anfast.cli.main
    except ImportError as error:  # an optional dependency (apex, timm) the options need
        print(f"anfast search: error: {error}", file=sys.stderr)
        return 2
    arch = result.arch
    fractions = {k: arch["student"][k] / arch["base"][k] for k in ("flops", "params")}
    print(f"anfast search: derived student {arch['student']['flops']:,} FLOPs ({fractions['flops']:.1%} of base), "
          f"{arch['student']['params']:,} params ({fractions['params']:.1%}); target {arch['target']}")
    print(f"  arch: {result.arch_path}\n  plot: {result.plot_path}\n"
          f"  train it: anfast train --arch {arch['arch']} --image-size {arch['image_size']} "
          f"--round-to {arch['round_to']} --arch-config {result.arch_path}"
          + (f" --data {args.data}" if args.data else ""))
    return 0
