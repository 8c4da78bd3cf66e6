"""Collect the per-case lines of tests/test_gpu_resnet50.py into one result file.

Question: does each fused backend compute what torch computes in float64 on every
distinct ResNet-50 conv (paper policy, alpha 4, batch 16), in bf16 and fp32, with
channels_last and NCHW inputs, for the outputs and every gradient?

The test writes one JSON line per case into $ANFAST_GPU_CORRECTNESS_LOG as it finishes
(benchmarks/gpu_check.sh sets it); this script adds the device, versions and commit,
counts pass / FAIL / raised / unavailable per backend, dtype and layout, names the
worst case of each, and prints that summary:

    python benchmarks/correctness_report.py OUT/correctness.jsonl --out OUT/correctness-resnet50.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402


def summarize(cases: list[dict]) -> dict:
    """{backend/dtype/layout: {counts..., worst: {layer, error}}} over ``cases``."""
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    worst: dict[str, tuple[float, str]] = {}
    for case in cases:
        key = f"{case['backend']}/{case['dtype']}/{case['layout']}"
        groups[key][case["status"]] += 1
        if case.get("worst") is not None and case["worst"] >= worst.get(key, (-1.0, ""))[0]:
            worst[key] = (case["worst"], case["layer"])
    return {key: {**counts, "worst_error": worst.get(key, (None, None))[0],
                  "worst_layer": worst.get(key, (None, None))[1]}
            for key, counts in sorted(groups.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the JSON lines the test wrote")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.log.exists():
        print(f"correctness_report: {args.log} does not exist (did the GPU tests run?)", file=sys.stderr)
        return 2
    cases = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    summary = summarize(cases)
    payload = {**environment(args.device), "question": __doc__.split("\n\n")[1].replace("\n", " "),
               "summary": summary, "cases": cases}
    path = write_result("correctness-resnet50", payload, args.out)
    print(f"{'backend/dtype/layout':<30}{'pass':>6}{'FAIL':>6}{'raised':>8}{'unavail':>9}  worst")
    for key, row in summary.items():
        worst = "-" if row["worst_error"] is None else f"{row['worst_error']:.2e} ({row['worst_layer']})"
        print(f"{key:<30}{row.get('pass', 0):>6}{row.get('FAIL', 0):>6}{row.get('raised', 0):>8}"
              f"{row.get('unavailable', 0):>9}  {worst}")
    print(f"wrote {path}")
    return 1 if any(row.get("FAIL", 0) or row.get("raised", 0) for row in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
