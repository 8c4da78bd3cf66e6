"""`anfast search`: the argparse front end of anfast.dan.search.

``register(subparsers)`` adds the command to the main ``anfast`` parser. The model flags
are anfast/cli/args.py's (less --alpha, --policy and --arch-config: a search trains its
own full-width student); the training flags take a search's defaults
(anfast.dan.search.search_training); the rest are the search's own. A flag left out
means its default, so `anfast search ... --resume auto` with the command that started a
search continues it.
"""

from __future__ import annotations

import argparse
import dataclasses

from anfast.cli.args import add_model_arguments, model_options
from anfast.dan.search import TAU_SCHEDULES, SearchConfig, search, search_training
from anfast.train.config import (BACKEND_CHOICES, COMPILE_CHOICES, LAMBDA_SCHEDULE_CHOICES, LOADER_CHOICES,
                                 OPTIMIZER_CHOICES)

__all__ = ["register", "config_from_args"]

_DEFAULTS = SearchConfig()
# TrainConfig fields a search takes from its command line beside the model flags: name, type
# (or choices), help. Each defaults to None, so search_training's default applies.
_TRAINING_FLAGS = (
    ("data", str, "folder with train/<class>/*.jpg (default: the built-in shapes set)"),
    ("epochs", int, None),
    ("lr", float, "network weight learning rate, warm-up then cosine"),
    ("min_lr", float, "learning rate at the end of the cosine"),
    ("warmup_epochs", float, "linear LR warm-up of the weights"),
    ("optimizer", OPTIMIZER_CHOICES, "network weight optimizer"),
    ("momentum", float, "--optimizer sgd only"),
    ("weight_decay", float, "not applied to biases and norms"),
    ("clip_grad", float, "max global gradient norm of the weights"),
    ("lambda_schedule", LAMBDA_SCHEDULE_CHOICES, "weight of KL + gamma * R over the search"),
    ("loader", LOADER_CHOICES, "input pipeline"),
    ("workers", int, "loader worker processes / threads"),
    ("backend", BACKEND_CHOICES, "adjoined conv kernels (see `anfast train --help`)"),
    ("seed", int, None),
    ("log_interval", int, "steps between reads of the loss on the host"),
    ("max_bad_steps", int, "non-finite steps to skip before the search stops with an error"),
    ("out", str, "run directory"),
)
_TRAINING_SWITCHES = ("compile", "resume", "overwrite", "sync_bn", "pretrained", "pretrained_skip_classifier")


def _choices(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a comma list of numbers such as 1,2,4,8") from None


def _default(name: str) -> str:
    return f"(default: {getattr(_DEFAULTS.train, name)})"


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``search`` to an ``add_subparsers()`` object; returns its parser."""
    parser = subparsers.add_parser(
        "search", help="DAN: search per-width-group alphas toward a FLOPs / params target",
        description="Differentiable Adjoined Network search: learn one width per width group so the "
                    "student meets a FLOPs or parameter target, then write RUN_DIR/arch.json for "
                    "`anfast train --arch-config RUN_DIR/arch.json`. Runs on the training engine: "
                    "AMP, --channels-last, --compile, torchrun, --resume.")
    add = parser.add_argument
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="student FLOPs as a fraction of the base's, e.g. 0.4")
    target.add_argument("--target-params", type=float, help="student parameters as a fraction of the base's")
    add_model_arguments(parser, skip=("alpha", "policy", "arch_config"))
    for name, kind, help_text in _TRAINING_FLAGS:
        typed = dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)
        add("--" + name.replace("_", "-"), **typed, help=f"{help_text + ' ' if help_text else ''}{_default(name)}")
    add("--compile", nargs="?", const="default", choices=COMPILE_CHOICES,
        help="torch.compile the gated network; a bare --compile is mode default (default: off)")
    add("--resume", help="checkpoint to continue from, or 'auto' (RUN_DIR/checkpoints/last.pt whenever it loads, "
                         "else the newer usable of last.prev.pt and best.pt); "
                         "give the options the search was started with")
    add("--overwrite", action="store_true", default=None, help="replace a search already in --out")
    add("--sync-bn", action=argparse.BooleanOptionalAction, help="SyncBatchNorm across torchrun ranks, CUDA only")
    add("--pretrained", help="start the network from a local checkpoint: .safetensors, a torchvision / timm "
                             ".pt/.pth state_dict, or an anfast export folder (RUN_DIR/base)")
    add("--pretrained-skip-classifier", action=argparse.BooleanOptionalAction,
        help="keep a fresh classifier (a checkpoint with another number of classes)")

    add("--choices", type=_choices, default=_DEFAULTS.choices,
        help="width divisors each group chooses from (default: 1,2,4,8)")
    for name, help_text in (
        ("gamma", "weight of the resource penalty"),
        ("tau0", "first Gumbel-softmax temperature (unset: 15 for --tau-schedule paper, 1 for anneal)"),
        ("tau_decay", "temperature factor per epoch, --tau-schedule paper"),
        ("tau_end", "last step's temperature, --tau-schedule anneal"),
        ("max_steps_per_epoch", "cap on steps per epoch"),
        ("arch_lr", "architecture logit learning rate (Adam)"),
        ("arch_weight_decay", None),
        ("arch_warmup", "fraction of the steps that train only the weights before the logits move"),
    ):
        kind = int if name == "max_steps_per_epoch" else float
        add("--" + name.replace("_", "-"), type=kind, default=getattr(_DEFAULTS, name),
            help=f"{help_text + ' ' if help_text else ''}(default: %(default)s)")
    add("--tau-schedule", default=_DEFAULTS.tau_schedule, choices=TAU_SCHEDULES,
        help="paper: tau0 * tau_decay^epoch; anneal: tau0 to tau_end geometrically over the search's "
             "steps; auto: paper from 50 epochs up, else anneal (default: %(default)s)")
    add("--frozen-noise", action="store_true", help="keep one Gumbel noise draw for the whole search (the paper)")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The SearchConfig the parsed flags describe."""
    names = [name for name, _, _ in _TRAINING_FLAGS] + list(_TRAINING_SWITCHES)
    training = {**model_options(args), **{name: getattr(args, name) for name in names
                                          if getattr(args, name, None) is not None}}
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)
               if f.name != "train" and hasattr(args, f.name)}
    return SearchConfig(**options, train=search_training(**training))


def run(args: argparse.Namespace) -> int:
    """Run the search (it prints the derived student and where its files went). Returns the
    exit code."""
    result = search(config_from_args(args))  # user errors: one line on stderr, by anfast.cli.main
    if isinstance(result, dict):  # a stop request: fit saved a checkpoint
        print(f"anfast search: interrupted; checkpoint {result['checkpoint']} (continue with --resume auto)")
    return 0
