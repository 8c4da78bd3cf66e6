"""Input pipeline throughput: DALI vs the torchvision DataLoader, same augmentations, same workers.

Question: how many images per second does each loader deliver from a JPEG folder of
ImageNet-like sizes, with ImageNet train augmentation (RandomResizedCrop + flip +
normalize) and eval preprocessing (resize, center crop, normalize)? Providers run
side by side in one process, interleaved over repeats, each through
anfast.data.create_loader exactly as training uses it:

- torch:     torchvision DataLoader, ``workers`` processes, PIL decode
- dali-cpu:  DALI CPU pipeline, ``workers`` threads
- dali-gpu:  DALI "mixed" decode on the GPU, ``workers`` threads (only with CUDA)

Without --data it generates (once, cached) 2,000 train + 2,000 val JPEGs of 300-500 px
with photo-like content. Writes JSON to benchmarks/results/loader-<device>-<date>.json.

    python benchmarks/loader.py                    # generated folder, all providers
    python benchmarks/loader.py --data /imagenet --batches 200 --tag imagenet
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from anfast.data import create_loader, default_data_home, has_dali
from anfast.data.builtin import create_atomically

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _photo_like(rng: np.random.Generator) -> Image.Image:
    # Smooth colour fields plus fine grain: JPEG sizes (~40-120 KB at 500 px) and decode
    # cost close to ImageNet photos, unlike flat synthetic images that decode far faster.
    height, width = (int(v) for v in rng.integers(300, 501, size=2))
    coarse = rng.uniform(0, 255, size=(max(2, height // 40), max(2, width // 40), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def bench_folder(num_images: int, classes: int = 10) -> pathlib.Path:
    """A cached ImageNet-layout folder of ``num_images`` train and as many val JPEGs."""

    def build(staging: pathlib.Path) -> None:
        rng = np.random.default_rng(0)
        counts = {"train": num_images, "val": num_images}
        jobs = [(split, i) for split, count in counts.items() for i in range(count)]
        for split, i in tqdm(jobs, desc="benchmark: writing JPEGs", unit="img"):
            folder = staging / split / f"class_{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            _photo_like(rng).save(folder / f"{i:06d}.jpg", quality=90)

    return create_atomically(default_data_home() / f"bench-jpeg-v2-{num_images}", build)


def measure(root, split: str, loader_name: str, device: str, args) -> dict:
    """Images/s over ``args.batches`` batches after ``args.warmup`` batches (workers started, queues full)."""
    loader = create_loader(root, split, batch_size=args.batch_size, image_size=args.image_size,
                           loader=loader_name, workers=args.workers, device=device,
                           channels_last=True, drop_last=split == "train")
    batches = min(args.batches, len(loader) - args.warmup)
    if batches < 1:
        raise SystemExit(f"{root}/{split} has {len(loader)} batches of {args.batch_size}; need more than "
                         f"--warmup {args.warmup}: lower --batch-size or use more images")
    iterator = iter(loader)
    for _ in range(args.warmup):
        next(iterator)
    images = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        batch, _ = next(iterator)
        images += batch.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for _ in iterator:  # finish the epoch so the loader's workers / pipeline shut down cleanly
        pass
    del iterator, loader
    gc.collect()  # the next provider must not share the cores with this one's workers
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, help="ImageNet-layout folder (default: generated)")
    parser.add_argument("--images", type=int, default=2000, help="train images to generate without --data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes = DALI threads")
    parser.add_argument("--batches", type=int, default=25, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix for the result file name, e.g. the dataset")
    args = parser.parse_args(argv)

    root = args.data if args.data is not None else bench_folder(args.images)
    load_at_start = os.getloadavg()[0]
    providers = [("torch", "torch", "cpu")]
    if has_dali():
        providers.append(("dali-cpu", "dali", "cpu"))
        if torch.cuda.is_available():
            providers += [("torch-to-cuda", "torch", "cuda"), ("dali-gpu", "dali", "cuda")]
    else:
        print("nvidia-dali is not installed: measuring the torch loader only", file=sys.stderr)

    rows = []
    for split in args.splits:
        runs = {name: [] for name, _, _ in providers}
        for repeat in range(args.repeats):
            for name, loader_name, device in providers:
                result = measure(root, split, loader_name, device, args)
                runs[name].append(result["images_per_s"])
                print(f"{split:5s} {name:14s} repeat {repeat}: {result['images_per_s']:8.1f} images/s")
        for name, loader_name, device in providers:
            rows.append({"split": split, "provider": name, "loader": loader_name, "device": device,
                         "images_per_s": statistics.median(runs[name]), "runs": runs[name]})
        torch_rate = statistics.median(runs["torch"])
        for name in runs:
            if name != "torch":
                print(f"{split}: {name} / torch = {statistics.median(runs[name]) / torch_rate:.2f}x")

    report = {
        "benchmark": "loader",
        **environment("cuda" if torch.cuda.is_available() else "cpu"),
        "cpu_count": os.cpu_count(),
        # Other jobs share the cores: the 1-minute load when the run started and ended.
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "data": str(root),
        "config": {key: (str(value) if isinstance(value, pathlib.Path) else value)
                   for key, value in vars(args).items()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda-" + torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    suffix = f"-{args.tag}" if args.tag else ""
    path = args.out / f"loader-{tag}-{datetime.date.today().isoformat()}{suffix}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
