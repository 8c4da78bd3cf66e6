"""``anfast info``: base vs student size and cost, next to the paper's numbers."""

from __future__ import annotations

import argparse

from anfast.adjoin import adjoin
from anfast.export import export_base, export_student
from anfast.profile import count_parameters, profile
from anfast.runs.errors import ConfigError
from anfast.train.config import POLICY_CHOICES, parse_alpha

__all__ = ["register", "describe"]

# Nath, Kushagra, Yang (AAAI-MAKE 2022), Table 1: the AN-trained ResNet-50 student. The
# paper's "FLOPs" are multiply-adds and its parameters leave out the classifier.
PAPER_RESNET50_STUDENT = {"params": 1.8e6, "gmacs": 1.6, "top1": 71.8}
# The paper's base is XResNet-50; the other two are ResNet-50s that differ in the stem.
_PAPER_BASES = ("xresnet50", "resnet50", "timm:resnet50d")


def describe(arch: str, alpha, policy: str, round_to: int, num_classes: int, image_size: int) -> str:
    """The text ``anfast info`` prints."""
    an = adjoin(arch, alpha=alpha, policy=policy, round_to=round_to, num_classes=num_classes,
                input_size=(3, image_size, image_size))
    size = (3, image_size, image_size)
    classifier = list(an.layer_widths)[-1]
    rows = [("base", export_base(an))] + [
        (f"student (alpha {a:g})", export_student(an, s)) for s, a in enumerate(an.alphas)
    ]
    lines = [f"{arch}, alpha {alpha}, policy {policy!r}, round_to {round_to}, {num_classes} classes, "
             f"{image_size}x{image_size} input", ""]
    without_label = "params w/o " + classifier
    w = max(22, len(without_label) + 2)  # that column fits the classifier's name
    lines.append(f"{'network':<22}{'params':>14}{without_label:>{w}}{'GFLOPs':>10}{'GMACs':>9}")
    for label, module in rows:
        stats = profile(module, size)
        without = count_parameters(module, exclude=(classifier,))
        lines.append(f"{label:<22}{stats['params']:>14,}{without:>{w},}{stats['flops'] / 1e9:>10.3f}"
                     f"{stats['flops'] / 2e9:>9.3f}")
    if arch in _PAPER_BASES and policy == "paper" and alpha == 4 and image_size == 224:
        paper = PAPER_RESNET50_STUDENT
        lines.append(f"{'paper (XResNet-50)':<22}{'':>14}{paper['params']:>{w},.0f}{'':>10}"
                     f"{paper['gmacs']:>9.1f}   top-1 {paper['top1']}%")
        lines.append(f"{'student / paper':<22}{'':>14}{without / paper['params']:>{w}.3f}{'':>10}"
                     f"{stats['flops'] / 2e9 / paper['gmacs']:>9.3f}")
    lines += ["", "GFLOPs count a multiply-add as 2 (torch.utils.flop_counter); GMACs = GFLOPs / 2.", "",
              f"{'layer':<34}{'kind':<10}{'in':>6}{'out':>6}  {'student in':>12}{'student out':>13}  group"]
    for name, widths in an.layer_widths.items():
        student_in = "/".join(map(str, widths.student_in))
        student_out = "/".join(map(str, widths.student_out))
        lines.append(f"{name:<34}{widths.kind:<10}{widths.in_channels:>6}{widths.out_channels:>6}  "
                     f"{student_in:>12}{student_out:>13}  {widths.out_group}")
    # Groups the model's structure keeps whole (a slice, a reordering, a layer scale...);
    # the class output is left out: it keeps every class by design.
    kept = [g for g in an.width_groups if g.fixed and g.producers and g.fixed != "model output"]
    if kept:
        lines += ["", f"Kept at full width in every student ({len(kept)} groups), and why:"]
        lines += [f"  {g.name:<32}{g.channels:>6}  {g.fixed}" for g in kept]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    for flag, value in (("--image-size", args.image_size), ("--num-classes", args.num_classes),
                        ("--round-to", args.round_to)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    alpha = parse_alpha(args.alpha)
    try:
        text = describe(args.arch, alpha[0] if len(alpha) == 1 else alpha, args.policy, args.round_to,
                        args.num_classes, args.image_size)
    except ValueError as error:  # unknown --arch, a model adjoin refuses
        raise ConfigError(str(error)) from error
    print(text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="sizes, FLOPs and per-layer widths of base and students",
                                   description="Print base vs student parameters and FLOPs and a per-layer "
                                               "width table; next to the paper's figures for ResNet-50s "
                                               "at alpha 4, policy paper, 224 px.")
    parser.add_argument("--arch", default="resnet50",
                        help="torchvision name, xresnet18/34/50/101 (the paper's network) or timm:NAME "
                             "(default resnet50)")
    parser.add_argument("--alpha", default="4", help="shrink factor, or a comma list for nested students")
    parser.add_argument("--policy", default="paper", choices=POLICY_CHOICES, help="which layers shrink")
    parser.add_argument("--round-to", type=int, default=8, help="round student widths to multiples of this")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.set_defaults(func=_run)
