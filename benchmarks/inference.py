"""Latency of an exported student vs its base, side by side in one process.

    python benchmarks/inference.py --arch resnet50 --alpha 4 --policy paper --batch 16

Both networks are plain torchvision modules (anfast.export_student / export_base),
timed interleaved in eval mode under torch.inference_mode: median and quartiles of
repeated runs, after warm-up. The speed-up is base median / student median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

import anfast  # noqa: E402


def _time(module: torch.nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", help="torchvision model name")
    parser.add_argument("--alpha", type=float, default=4)
    parser.add_argument("--policy", default="paper", choices=["paper", "all"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per network")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fold-bn", action="store_true",
                        help="fold eval-mode BatchNorm into the convs (torch.fx.experimental.optimization.fuse), "
                             "as a deployment would")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/inference-<device>-<date>.json)")
    args = parser.parse_args(argv)

    size = (3, args.image_size, args.image_size)
    an = anfast.adjoin(args.arch, alpha=args.alpha, policy=args.policy, input_size=size).eval()
    networks = {"base": anfast.export_base(an).eval(), "student": anfast.export_student(an).eval()}
    if args.fold_bn:
        networks = {name: fuse(module) for name, module in networks.items()}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, *size, device=args.device).to(memory_format=memory_format)
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.inference_mode():
        for name, module in networks.items():
            networks[name] = module.to(args.device, memory_format=memory_format)
            for _ in range(args.warmup):
                module(x)
        for _ in tqdm(range(args.repeats), desc="timing base and student, interleaved"):
            for name, module in networks.items():
                times[name].append(_time(module, x))

    rows = {}
    for name, module in networks.items():
        stats = anfast.profile(module, size)
        q1, median, q3 = statistics.quantiles(times[name], n=4)
        rows[name] = {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                      "images_per_s": args.batch / median, **stats}
    speedup = rows["base"]["median_ms"] / rows["student"]["median_ms"]
    result = {"benchmark": "inference", **environment(args.device), "config": vars(args), "networks": rows,
              "speedup_student_vs_base": speedup,
              "flops_ratio_base_vs_student": rows["base"]["flops"] / rows["student"]["flops"]}
    path = write_result("inference", result, args.out)
    for name, row in rows.items():
        print(f"{name:8} {row['median_ms']:9.1f} ms  (q1 {row['q1_ms']:.1f}, q3 {row['q3_ms']:.1f})  "
              f"{row['params'] / 1e6:6.2f}M params  {row['flops'] / 1e9:6.2f} GFLOPs")
    print(f"student speed-up: {speedup:.2f}x  (FLOPs ratio {result['flops_ratio_base_vs_student']:.2f}x)  -> {path}")
    return result


if __name__ == "__main__":
    main()
