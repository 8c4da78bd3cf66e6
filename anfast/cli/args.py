"""The flags several commands share, declared once.

``add_model_arguments`` declares the flags that say which adjoined model a command
builds (``anfast train``, ``tune``, ``info``, ``search``): every one defaults to None,
and ``model_options`` passes only the given ones to TrainConfig, so a flag left out
means TrainConfig's default, in every command alike. ``anfast tune`` with no model
flags therefore tunes the very model ``anfast train`` with no model flags trains.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Sequence

from anfast.train.config import AMP_CHOICES, POLICY_CHOICES, TrainConfig

__all__ = ["MODEL_OPTIONS", "add_model_arguments", "model_options", "default_help", "add_run_arguments"]

_DEFAULTS = TrainConfig()

# TrainConfig fields that say which network is built, at which batch shape and precision.
MODEL_OPTIONS = ("arch", "alpha", "policy", "arch_config", "round_to", "batch_size", "image_size",
                 "amp", "channels_last", "device")


def default_help(name: str) -> str:
    """"(default: VALUE)" of TrainConfig field ``name``, for a flag's help."""
    value = getattr(_DEFAULTS, name)
    if name == "alpha":
        value = ",".join(f"{a:g}" for a in value)
    return f"(default: {value})"


def add_model_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """The MODEL_OPTIONS flags (less ``skip``), each None unless given."""
    flags = {
        "arch": dict(help=f"torchvision name, xresnet18/34/50/101 (the paper's network), or timm:NAME "
                          f"(pip install 'anfast[timm]') {default_help('arch')}"),
        "alpha": dict(help=f"student width divisor; a comma list (2,4,8) gives nested students "
                           f"{default_help('alpha')}"),
        "policy": dict(choices=POLICY_CHOICES,
                       help=f"which layers shrink: paper (convs with in and out channels > 64) or all "
                            f"{default_help('policy')}"),
        "arch_config": dict(help="per-width-group alphas from `anfast search` (JSON "
                                 "{\"groups\": {name: alpha}}); replaces --policy and builds one student "
                                 "(no comma list of --alpha)"),
        "round_to": dict(type=int, help=f"student widths round up to this {default_help('round_to')}"),
        "batch_size": dict(type=int, help=f"per process {default_help('batch_size')}"),
        "image_size": dict(type=int, help=f"train crop and val size in pixels {default_help('image_size')}"),
        "amp": dict(choices=AMP_CHOICES,
                    help=f"autocast dtype; auto is bf16 on CUDA, off on CPU {default_help('amp')}"),
        "channels_last": dict(action=argparse.BooleanOptionalAction,
                              help=f"NHWC activations and weights {default_help('channels_last')}"),
        "device": dict(help=f"cpu, cuda or cuda:N {default_help('device')}"),
    }
    for name in MODEL_OPTIONS:
        if name not in skip:
            parser.add_argument("--" + name.replace("_", "-"), **flags[name])


def model_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The MODEL_OPTIONS the command line gave (TrainConfig field names); the rest are
    left to TrainConfig's defaults."""
    return {name: getattr(args, name) for name in MODEL_OPTIONS
            if getattr(args, name, None) is not None}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR and --checkpoint, shared by `eval` and `export`."""
    parser.add_argument("run_dir", help="a run directory written by `anfast train`")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint (default: best)")
