"""Training img/s: plain base vs anfast AN vs the authors' masked formulation, one run.

Question: how much faster is an AN training step when the student is computed at its
real width (anfast) than in the authors' public code, which computes the student at
FULL width and zeroes its trailing channels after each conv (so the student costs
what the base costs)? Plain base training is the floor both are compared against.

Providers, all with SGD, the same model, data and precision:
  base    torchvision model, cross-entropy
  anfast  anfast.adjoin(model, alpha, policy) + anfast.AdjoinedLoss
  masked  the base plus a full-width student that shares the conv / linear modules
          (so the same weights), has its own BatchNorms, and multiplies every shrunk
          conv's output by a 0/1 channel mask of width(C, alpha); same AdjoinedLoss

Synthetic data already on the device. Rounds alternate the providers so a machine
whose load drifts affects all of them alike; each provider's median step time gives
its img/s. On CUDA: bf16 autocast and channels_last.

    python benchmarks/train_throughput.py                       # CPU: ResNet-50, 64 px, batch 8
    python benchmarks/train_throughput.py --device cuda --image-size 224 --batch-size 64

Writes benchmarks/results/train_throughput-<device>-<date>.json, or
OUT/train_throughput.json with --out OUT (a directory).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import anfast
from anfast.adjoin import PAPER_MIN_CHANNELS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402


class MaskedConv2d(nn.Module):
    """The authors' student conv: the shared full-width conv, trailing channels zeroed."""

    def __init__(self, conv: nn.Conv2d, kept_channels: int):
        super().__init__()
        self.conv = conv  # the base's module itself: shared weights, full-width cost
        mask = torch.zeros(1, conv.out_channels, 1, 1)
        mask[:, :kept_channels] = 1
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.mask


def masked_student(base: nn.Module, alpha: float, round_to: int) -> nn.Module:
    """A full-width student of ``base`` per the paper policy (convs with in and out > 64)."""
    student = copy.deepcopy(base)  # private BatchNorms, as in the paper
    for name, module in base.named_modules():
        if isinstance(module, nn.Conv2d):
            shrinks = min(module.in_channels, module.out_channels) > PAPER_MIN_CHANNELS
            kept = (anfast.student_width(module.out_channels, alpha, round_to) if shrinks
                    else module.out_channels)
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, MaskedConv2d(module, kept))
        elif isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, module)
    return student


class MaskedAdjoined(nn.Module):
    """Base and masked student in one module whose output is an AdjoinedOutput."""

    def __init__(self, base: nn.Module, alpha: float, round_to: int):
        super().__init__()
        self.base = base
        self.student = masked_student(base, alpha, round_to)

    def forward(self, x):
        return anfast.AdjoinedOutput(self.base(x), (self.student(x),))


def build_providers(arch: str, alpha: float, num_classes: int, input_size) -> dict:
    torch.manual_seed(0)
    base = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    adjoined = anfast.adjoin(copy.deepcopy(base), alpha=alpha, policy="paper", round_to=8,
                             input_size=input_size)
    masked = MaskedAdjoined(copy.deepcopy(base), alpha, 8)
    adjoined_loss = anfast.AdjoinedLoss()
    return {
        "base": (base, lambda out, target: F.cross_entropy(out, target)),
        "anfast": (adjoined, lambda out, target: adjoined_loss(out, target, 1.0)),
        "masked": (masked, lambda out, target: adjoined_loss(out, target, 1.0)),
    }


def time_steps(model, loss_fn, optimizer, images, labels, steps, amp_dtype) -> list:
    device = images.device
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--image-size", type=int, default=None, help="default: 64 CPU, 224 CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 CPU, 64 CUDA")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC activations (default: on CUDA only)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per provider per round")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON (default: benchmarks/results/)")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    image_size = args.image_size or (224 if on_cuda else 64)
    batch_size = args.batch_size or (64 if on_cuda else 8)
    amp_dtype = torch.bfloat16 if on_cuda else None
    channels_last = on_cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    num_classes = 1000

    providers = build_providers(args.arch, args.alpha, num_classes, (3, image_size, image_size))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    optimizers = {}
    for name, (model, _) in providers.items():
        model.to(device=device, memory_format=memory_format).train()
        optimizers[name] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    load_before = os.getloadavg()
    for name, (model, loss_fn) in providers.items():
        time_steps(model, loss_fn, optimizers[name], images, labels, args.warmup, amp_dtype)
    times = {name: [] for name in providers}
    for round_index in range(args.rounds):
        for name, (model, loss_fn) in providers.items():
            times[name] += time_steps(model, loss_fn, optimizers[name], images, labels,
                                      args.steps, amp_dtype)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {batch_size / statistics.median(t):.1f} img/s" for name, t in times.items()),
            flush=True)
    load_after = os.getloadavg()

    rows = {}
    for name, step_times in times.items():
        median = statistics.median(step_times)
        rows[name] = {"images_per_second": batch_size / median, "median_step_s": median,
                      "min_step_s": min(step_times), "max_step_s": max(step_times),
                      "steps": len(step_times)}
    ratios = {
        "anfast_over_masked": rows["anfast"]["images_per_second"] / rows["masked"]["images_per_second"],
        "anfast_over_base": rows["anfast"]["images_per_second"] / rows["base"]["images_per_second"],
        "masked_over_base": rows["masked"]["images_per_second"] / rows["base"]["images_per_second"],
    }
    result = {
        "benchmark": "train_throughput",
        "question": "AN training img/s: anfast (student at real width) vs the authors' "
                    "masked full-width student vs plain base training",
        **environment(device),
        "arch": args.arch, "alpha": args.alpha, "policy": "paper", "image_size": image_size,
        "batch_size": batch_size, "precision": "bf16" if amp_dtype else "fp32",
        "channels_last": channels_last, "warmup_steps": args.warmup, "rounds": args.rounds,
        "steps_per_round": args.steps, "load_average_before": load_before,
        "load_average_after": load_after,
        "anfast_backend": os.environ.get("ANFAST_BACKEND", "auto"), "providers": rows,
        "ratios": ratios, "anfast_version": anfast.__version__,
    }
    path = write_result("train_throughput", result,
                        None if args.out is None else args.out / "train_throughput.json")
    print(json.dumps({"ratios": ratios, **{k: v["images_per_second"] for k, v in rows.items()}},
                     indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
