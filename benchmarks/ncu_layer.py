"""Nsight Compute metrics of one ResNet-50 conv's fused kernels, next to cuDNN's.

Question: what limits the slowest fused layer of each backend (measured by `anfast
tune`: CUDA C++ 2.0x and Triton 7.2x cuDNN's time on the H200)? Its compute and
memory throughput, occupancy and warp stalls, kernel by kernel, per phase (forward,
dgrad, wgrad), beside the same numbers for the two cuDNN convs it replaces, so that
the next kernel work aims at the right bottleneck. Three subcommands:

    python benchmarks/ncu_layer.py pick OUT/tune-resnet50.json benchmarks/results/tune-*.json
        # prints "BACKEND LAYER RATIO": each fused backend's slowest layer vs torch
        # (the first file that measured a backend decides for it)

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        --export OUT/ncu-fused-cuda-layer1.0.conv2 \\
        python benchmarks/ncu_layer.py run --layer layer1.0.conv2 --provider fused-cuda
        # warms the provider up (Triton compiles and autotunes there), then runs forward,
        # dgrad and wgrad once each between cudaProfilerStart / Stop; a marker kernel
        # (torch.cuda._sleep's spin_kernel) precedes each phase so the report can be split

    python benchmarks/ncu_layer.py summarize OUT/ncu-*.csv --out OUT/ncu.json [--environment OUT/environment.json]
        # reads `ncu --import REP --csv --page details` output: per kernel its phase,
        # grid, block and every metric; a table of the main ones; device, versions, commit

benchmarks/gpu_check.sh (step `ncu`) runs all three. Providers are conv.py's:
fused-cuda, fused-triton, cudnn-x2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, tune_ratios, write_result  # noqa: E402

PHASE_ORDER = ("forward", "dgrad", "wgrad")
MARKER_KERNEL = "spin_kernel"  # what torch.cuda._sleep launches
TIME_UNITS_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
                 "second": 1e6, "s": 1e6}
# Columns of the printed table: (heading, ncu "Metric Name", format).
TABLE = (("us", "Duration", "{:.1f}"), ("SM %", "Compute (SM) Throughput", "{:.1f}"),
         ("mem %", "Memory Throughput", "{:.1f}"), ("DRAM %", "DRAM Throughput", "{:.1f}"),
         ("regs", "Registers Per Thread", "{:.0f}"), ("occ %", "Achieved Occupancy", "{:.1f}"),
         ("IPC", "Executed Ipc Active", "{:.2f}"))


def slowest_layers(tune_files: list[Path]) -> dict[str, tuple[str, float]]:
    """backend -> (layer, its time / torch's time) of its slowest verified layer.

    The first file that measured a backend decides for it (pass the freshest first)."""
    found: dict[str, tuple[str, float]] = {}
    for path in tune_files:
        for backend, per_layer in tune_ratios(path).items():
            found.setdefault(backend, max(per_layer.items(), key=lambda item: item[1]))
    return found


def number(text: str):
    """An ncu CSV value as a float ("1,234.5" -> 1234.5), or the text when it is not one."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse_details_csv(text: str) -> list[dict]:
    """Kernels of an `ncu --csv --page details` listing, in launch order, each with its
    phase (split at the marker kernels; None before the first), grid, block and
    metrics {"Section / Metric Name": {"value", "unit"}}; marker kernels are dropped."""
    # ncu prints its own "==PROF==" / "==WARNING==" lines around the quoted CSV rows.
    rows = [line for line in text.splitlines() if line.startswith('"')]
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(rows):
        kernel_id = row.get("ID", "")
        if not row.get("Metric Name"):
            continue
        kernel = kernels.setdefault(kernel_id, {
            "id": int(kernel_id) if kernel_id.isdigit() else kernel_id,
            "name": row.get("Kernel Name", ""), "grid": row.get("Grid Size", ""),
            "block": row.get("Block Size", ""), "metrics": {}})
        key = f"{row.get('Section Name', '')} / {row['Metric Name']}".strip(" /")
        kernel["metrics"][key] = {"value": number(row.get("Metric Value", "")), "unit": row.get("Metric Unit", "")}
    # Launch order: numeric IDs as numbers (2 before 10), any other ID after them.
    ordered = sorted(kernels.values(), key=lambda k: (0, k["id"], "") if isinstance(k["id"], int)
                     else (1, 0, k["id"]))
    phases = iter(PHASE_ORDER)
    phase = None
    result = []
    for kernel in ordered:
        if MARKER_KERNEL in kernel["name"]:
            phase = next(phases, "after " + (phase or ""))
            continue
        result.append({"phase": phase, **kernel})
    return result


def metric(kernel: dict, name: str):
    """The value of the metric called ``name`` in any section (durations in us), or None."""
    for key, entry in kernel["metrics"].items():
        if key.rsplit(" / ", 1)[-1] == name and isinstance(entry["value"], float):
            scale = TIME_UNITS_US.get(entry["unit"], 1.0) if name == "Duration" else 1.0
            return entry["value"] * scale
    return None


def short_name(name: str, width: int = 46) -> str:
    """A kernel's name without template arguments and parameters, cut to ``width``."""
    depth, out = 0, []
    for char in name:
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        elif depth == 0:
            out.append(char)
    text = "".join(out).strip() or name
    return text if len(text) <= width else text[: width - 3] + "..."


def summarize(paths: list[Path]) -> list[dict]:
    """One entry per report: its provider and layer (from the file name
    ncu-PROVIDER-LAYER.csv), kernels, and phase totals of duration in us."""
    reports = []
    for path in paths:
        parts = path.stem.removeprefix("ncu-").split("-")  # providers are fused-cuda, cudnn-x2, ...
        provider, layer = "-".join(parts[:2]), "-".join(parts[2:])
        kernels = parse_details_csv(path.read_text(errors="replace"))
        totals: dict[str, float] = {}
        for kernel in kernels:
            duration = metric(kernel, "Duration")
            if duration is not None:
                totals[kernel["phase"] or "unmarked"] = totals.get(kernel["phase"] or "unmarked", 0.0) + duration
        reports.append({"file": path.name, "provider": provider, "layer": layer, "kernels": kernels,
                        "phase_us": totals})
    return reports


def print_table(reports: list[dict]) -> None:
    heading = f"{'phase':<8}{'kernel':<48}" + "".join(f"{h:>8}" for h, _, _ in TABLE)
    for report in reports:
        print(f"\n{report['provider']} on {report['layer']}: " + ", ".join(
            f"{phase} {us:.0f} us" for phase, us in report["phase_us"].items()))
        print(heading)
        for kernel in report["kernels"]:
            cells = []
            for _, name, fmt in TABLE:
                value = metric(kernel, name)
                cells.append(f"{'-' if value is None else fmt.format(value):>8}")
            print(f"{kernel['phase'] or '-':<8}{short_name(kernel['name']):<48}" + "".join(cells))


def run(layer: str, provider: str, batch: int, dtype_name: str, warmup: int) -> int:
    """Warm ``provider`` up on ``layer``, then run its phases once inside the profiled range."""
    import torch

    from conv import DTYPES, make_problem, phase_calls, providers, resnet50_conv_shapes, variant_run

    if not torch.cuda.is_available():
        print("benchmarks/ncu_layer.py run: no CUDA device visible; it profiles GPU kernels.", file=sys.stderr)
        return 2
    shapes = [shape for names, shape in resnet50_conv_shapes(4.0) if layer in names]
    if not shapes:
        print(f"benchmarks/ncu_layer.py run: {layer!r} is not a conv of ResNet-50 (names look like "
              f"layer1.0.conv2)", file=sys.stderr)
        return 2
    problem, grad_base, grad_student = make_problem(shapes[0], batch, DTYPES[dtype_name])
    found = providers(problem, compiled=False)
    if provider not in found:
        print(f"benchmarks/ncu_layer.py run: provider {provider!r} cannot run {layer} here; "
              f"available: {sorted(found)}", file=sys.stderr)
        return 2
    calls = phase_calls(*found[provider], grad_base, grad_student)
    for _ in range(warmup):  # compiles, autotunes and allocates outside the profiled range
        for phase in PHASE_ORDER:
            calls[phase]()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for phase in PHASE_ORDER:
        torch.cuda._sleep(1000)  # the marker that starts this phase in the report
        with torch.cuda.nvtx.range(f"{provider}/{phase}"):
            calls[phase]()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    variant = variant_run(provider, problem)
    print(f"ran {provider}{'' if variant is None else f' (variant {variant})'} on {layer} ({shapes[0]}) "
          f"at batch {batch}, {dtype_name}: {', '.join(PHASE_ORDER)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pick = sub.add_parser("pick", help="print each fused backend's slowest layer in tune JSON files")
    pick.add_argument("tune_files", nargs="+", type=Path)
    run_parser = sub.add_parser("run", help="run one layer's phases for ncu (GPU)")
    run_parser.add_argument("--layer", required=True)
    run_parser.add_argument("--provider", required=True, help="fused-cuda, fused-triton or cudnn-x2")
    run_parser.add_argument("--batch", type=int, default=256)
    run_parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    run_parser.add_argument("--warmup", type=int, default=3)
    summary = sub.add_parser("summarize", help="ncu CSV listings -> JSON and a table")
    summary.add_argument("csv_files", nargs="+", type=Path)
    summary.add_argument("--out", type=Path, required=True)
    summary.add_argument("--environment", type=Path, default=None,
                         help="an environment JSON of the GPU machine (benchmarks/common.py --out) "
                              "to record instead of this machine's (for listings read elsewhere)")
    args = parser.parse_args(argv)

    if args.command == "pick":
        present = [path for path in args.tune_files if path.is_file()]
        for backend, (layer, ratio) in slowest_layers(present).items():
            print(f"{backend} {layer} {ratio:.2f}")
        return 0
    if args.command == "run":
        return run(args.layer, args.provider, args.batch, args.dtype, args.warmup)
    import torch

    reports = summarize(args.csv_files)
    print_table(reports)
    empty = [report["file"] for report in reports if not report["kernels"]]
    if args.environment is not None:
        machine = json.loads(args.environment.read_text())
    else:
        machine = environment("cuda" if torch.cuda.is_available() else "cpu")
    path = write_result("ncu", {
        "benchmark": "ncu_layer",
        "question": "what limits each fused backend's slowest ResNet-50 layer, kernel by kernel, "
                    "next to cuDNN's kernels for the same layer (Nsight Compute, --clock-control none)",
        **machine, "reports": reports}, args.out)
    print(f"wrote {path}")
    if empty:
        print(f"benchmarks/ncu_layer.py: no profiled kernel in {', '.join(empty)}: was the range between "
              f"cudaProfilerStart / Stop profiled (ncu --profile-from-start off)?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
