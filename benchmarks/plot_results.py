"""One picture of a GPU's results: each fused backend's time per ResNet-50 conv against
cuDNN's, and training img/s per provider.

Question: where do the fused kernels lose to cuDNN, layer by layer, and what does that
leave of AN training's speed? The README's figure; made from result files only (no GPU):

    python benchmarks/plot_results.py \\
        --tune results/tune-resnet50-cuda-nvidia-h200-2026-11-26.json \\
               results/tune-resnet50-triton-conv2-nvidia-h200-2026-11-26.json \\
        --throughput results/train_throughput-nvidia-h200-2026-11-26.json \\
        --out results/nvidia-h200-2026-11-26.png

Left: for every conv of the tune files in network order, each verified fused backend's
forward + backward time over the torch backend's (two cuDNN convs); 1 is cuDNN's time,
the dashed lines each backend's count-weighted geometric mean. Right: the
train_throughput.py providers' img/s (eager), with each one's ratio to plain training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import tune_ratios  # noqa: E402

PROVIDER_LABELS = {"base": "plain base", "anfast": "anfast (auto)", "anfast_torch": "anfast (torch)",
                   "masked": "authors' masked student"}
COLORS = {"cuda": "tab:blue", "triton": "tab:orange"}


def layer_ratios(tune_files: list[Path]) -> dict[str, dict[str, float]]:
    """backend -> {layer: fused ms / torch ms} over the verified candidates of the files."""
    ratios: dict[str, dict[str, float]] = {}
    for path in tune_files:
        for backend, per_layer in tune_ratios(path).items():
            ratios.setdefault(backend, {}).update(per_layer)
    return ratios


def network_order(layer: str) -> tuple:
    """Sort key of torchvision ResNet module names: stem, then layerN.block.conv in order."""
    parts = []
    for part in layer.split("."):
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return tuple(parts)


def cudnn_version(text: str) -> str:
    """torch.backends.cudnn.version()'s number as a release: "91900" -> "9.19" (cuDNN 9
    numbers major * 10000 + minor * 100 + patch), "8902" -> "8.9" (cuDNN 8: major * 1000)."""
    if not str(text).isdigit():
        return str(text)
    number = int(text)
    if number >= 10000:
        return f"{number // 10000}.{number % 10000 // 100}"
    return f"{number // 1000}.{number % 1000 // 100}"


def plot(tune_files: list[Path], throughput_file: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ratios = layer_ratios(tune_files)
    if not ratios:
        raise SystemExit(f"benchmarks/plot_results.py: no verified fused candidate in {[str(p) for p in tune_files]}")
    throughput = json.loads(Path(throughput_file).read_text())
    layers = sorted({layer for per_layer in ratios.values() for layer in per_layer}, key=network_order)
    position = {layer: i for i, layer in enumerate(layers)}

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3.2, 1]})
    width = 0.8 / len(ratios)
    for index, (backend, per_layer) in enumerate(sorted(ratios.items())):
        xs = [position[layer] + (index - (len(ratios) - 1) / 2) * width for layer in per_layer]
        color = COLORS.get(backend)
        mean = statistics.geometric_mean(per_layer.values())
        left.bar(xs, list(per_layer.values()), width=width, color=color,
                 label=f"{backend}: geomean {mean:.2f}x over {len(per_layer)} convs")
        left.axhline(mean, color=color, linestyle="--", linewidth=1)
    left.axhline(1.0, color="black", linewidth=1)
    left.text(len(layers) - 0.5, 1.0, " cuDNN", va="bottom", ha="right", fontsize=8)
    left.set_yscale("log")
    left.set_yticks([1, 2, 4, 8])
    left.set_yticklabels(["1x", "2x", "4x", "8x"])
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xticks(range(len(layers)))
    left.set_xticklabels(layers, rotation=90, fontsize=6)
    left.set_xlim(-0.7, len(layers) - 0.3)
    left.set_ylabel("fused time / two cuDNN convs (fwd + bwd)")
    left.set_title("fused adjoined conv vs cuDNN, per ResNet-50 conv (lower is better)")
    left.legend(fontsize=8, loc="upper right")

    rows = throughput["providers"]
    names = [name for name in PROVIDER_LABELS if name in rows]
    speeds = [rows[name]["images_per_second"] for name in names]
    bars = right.barh([PROVIDER_LABELS[name] for name in names], speeds, color="tab:green")
    base = rows.get("base", {}).get("images_per_second")
    for bar, speed in zip(bars, speeds):
        note = f"{speed:.0f}" + (f"  ({speed / base:.2f}x plain)" if base and speed != base else "")
        right.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note, va="center", fontsize=8)
    right.invert_yaxis()
    right.set_xlim(0, max(speeds) * 1.6)
    right.set_xlabel("training img/s (higher is better)")
    right.set_title(f"{throughput.get('arch', '')} training, batch {throughput.get('batch_size', '?')}, "
                    f"{throughput.get('precision', '')}", fontsize=10)

    date = str(throughput.get("date", ""))[:10]
    versions = throughput.get("versions", {})
    fig.suptitle(f"{throughput.get('device', '')}, {date}: torch {versions.get('torch', '?')}, "
                 f"CUDA {versions.get('cuda', '?')}, cuDNN {cudnn_version(versions.get('cudnn', '?'))}; ResNet-50, "
                 f"paper policy, alpha 4, bf16, channels_last", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune", nargs="+", type=Path, required=True, help="anfast tune JSON files")
    parser.add_argument("--throughput", type=Path, required=True, help="a train_throughput.py JSON")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    missing = [str(p) for p in [*args.tune, args.throughput] if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    print(f"wrote {plot(args.tune, args.throughput, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
