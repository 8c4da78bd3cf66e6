"""Derive the searched student: one alpha per width group, its exact cost, arch.json, a plot.

arch.json is what ``anfast train --arch-config`` reads:

    {"format": "anfast.arch/1", "arch": "<--arch name>", "num_classes": N,
     "image_size": S, "round_to": 8,
     "policy": {"<producer module>": alpha, ...},   # a dict policy for anfast.adjoin
     "groups": {"<group name>": {"alpha": a, "channels": C, "width": w}, ...},
     "student": {"params": P, "flops": F}, "base": {"params": P, "flops": F},
     "target": {"flops": 0.4}, "choices": [1, 2, 4, 8],
     "layers": {"<conv or linear>": {"channels": C, "width": w}, ...}}

Counts are anfast.profile's (FLOPs = 2 x multiply-adds) at batch 1 and image_size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from anfast.adjoin import adjoin
from anfast.dan.space import DanError
from anfast.export import export_base, export_student
from anfast.models import arch_name
from anfast.profile import profile
from anfast.runs.checkpoint import write_text_atomically

__all__ = ["ARCH_FORMAT", "derive", "write_arch", "read_arch", "plot_widths"]

ARCH_FORMAT = "anfast.arch/1"


def derive(
    model: Union[nn.Module, str],
    group_alphas: Mapping[str, float],
    *,
    image_size: int,
    round_to: int = 8,
    target: Optional[Mapping[str, float]] = None,
    choices: Optional[Sequence[float]] = None,
    **model_kwargs,
) -> dict[str, Any]:
    """The arch record of the student that gives each width group its alpha.

    Args:
        model: the searched model, or its --arch name (with ``model_kwargs`` such
            as ``num_classes=10``).
        group_alphas: {width group name: alpha}; unlisted groups keep full width.
        image_size: input side in pixels, for the FLOPs count.
        round_to: student widths round up to multiples of this, as in anfast.adjoin.
        target, choices: the search's target and choices, recorded as given.

    Returns:
        The arch.json record (see the module docstring), with the student's params
        and FLOPs measured by anfast.profile on anfast.export_student.
    """
    input_size = (3, image_size, image_size)
    probe = adjoin(model, alpha=1, policy="all", round_to=round_to, input_size=input_size, **model_kwargs)
    groups = {g.name: g for g in probe.width_groups}
    unknown = sorted(set(group_alphas) - set(groups))
    if unknown:
        raise DanError(f"group_alphas names {unknown}, which are not width groups of the model; "
                       f"its groups are {sorted(groups)}")
    fixed = sorted(name for name, alpha in group_alphas.items() if groups[name].fixed and alpha != 1)
    if fixed:
        raise DanError(f"groups {fixed} cannot shrink ({groups[fixed[0]].fixed}); give them alpha 1")
    policy = {producer: float(alpha) for name, alpha in group_alphas.items()
              for producer in groups[name].producers}
    network = adjoin(model, alpha=1, policy=policy, round_to=round_to, input_size=input_size, **model_kwargs)
    student, base = export_student(network).eval(), export_base(network).eval()
    with torch.no_grad():
        num_classes = int(base(torch.zeros(1, *input_size, device=next(base.parameters()).device)).shape[-1])
    source = network.source
    return {
        "format": ARCH_FORMAT,
        "arch": arch_name(source) or source.get("class"),
        "num_classes": num_classes,
        "image_size": image_size,
        "round_to": round_to,
        "policy": policy,
        "groups": {g.name: {"alpha": float(group_alphas.get(g.name, 1.0)), "channels": g.channels,
                            "width": g.widths[0]}
                   for g in network.width_groups if not g.fixed},
        "student": profile(student, input_size),
        "base": profile(base, input_size),
        "target": dict(target or {}),
        "choices": [float(c) for c in choices] if choices is not None else None,
        "layers": {name: {"channels": w.out_channels, "width": w.student_out[0]}
                   for name, w in network.layer_widths.items() if w.kind in ("conv", "linear")},
    }


def write_arch(arch: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write an arch record as JSON (write_text_atomically: a crash leaves no half file)."""
    path = Path(path)
    write_text_atomically(path, json.dumps(arch, indent=2) + "\n")
    return path


def read_arch(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read an arch.json written by ``anfast search`` / write_arch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such arch file; `anfast search` writes RUN_DIR/arch.json")
    try:
        arch = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DanError(f"{path}: not JSON ({error}); write it with `anfast search`") from None
    found = arch.get("format") if isinstance(arch, dict) else type(arch).__name__
    if not isinstance(arch, dict) or found != ARCH_FORMAT or not isinstance(arch.get("policy"), dict):
        raise DanError(f"{path}: not an arch record (format {found!r}, expected {ARCH_FORMAT!r} "
                       "with a 'policy' dict); write it with `anfast search`")
    return arch


def plot_widths(arch: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """A PNG bar chart of each conv / linear layer's output width: base next to student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arch["layers"])
    base = [arch["layers"][n]["channels"] for n in names]
    student = [arch["layers"][n]["width"] for n in names]
    positions = range(len(names))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.2))
    axes.bar([p - 0.2 for p in positions], base, width=0.4, label="base", color="#b0b8c4")
    axes.bar([p + 0.2 for p in positions], student, width=0.4, label="derived student", color="#1f5fa8")
    axes.set_xticks(list(positions), names, rotation=90, fontsize=6)
    axes.set_ylabel("output channels")
    fractions = {k: arch["student"][k] / arch["base"][k] for k in ("flops", "params")}
    axes.set_title(f"{arch['arch']}: student {fractions['flops']:.1%} of base FLOPs, "
                   f"{fractions['params']:.1%} of params (target {arch['target']})", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
