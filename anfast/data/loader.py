"""create_loader: one entry point for the torchvision and DALI input pipelines."""

from __future__ import annotations

import functools
import os

import torch

from anfast.data.folder import DataLayoutError, scan_split

__all__ = ["LOADERS", "choose_loader", "create_loader", "has_dali"]

LOADERS = ("auto", "torch", "dali")
DALI_INSTALL_HINT = "pip install anfast[dali] (CUDA 13 wheel nvidia-dali-cuda130; on CUDA 12 pip install nvidia-dali-cuda120)"


@functools.lru_cache(maxsize=None)
def has_dali() -> bool:
    """Whether NVIDIA DALI and its PyTorch plugin import here (checked once, on first use).

    Importing rather than looking the package up means a DALI wheel built for another
    CUDA or Python makes "auto" fall back to torch instead of failing at the first batch.
    """
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def choose_loader(loader: str, device: torch.device) -> tuple[str, str]:
    """Resolve ``loader`` ("auto", "torch" or "dali") to a loader name and a one-line reason.

    Auto picks DALI whenever it is installed. On a CUDA device it decodes JPEGs on the
    GPU ("mixed" decoder), freeing the CPU cores that otherwise bound the input rate.
    On the CPU its thread pool still beat the torchvision DataLoader at equal workers
    on a 2-core machine: 1.7x the images/s for training and 1.6x for validation on
    300-500 px JPEGs at 224 px, 5.0x / 3.0x on the 64 px built-in dataset at 56 px
    (benchmarks/results/loader-cpu-2026-11-25*.json, docs/data.md).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader={loader!r} is not one of {LOADERS}")
    if loader == "torch":
        return "torch", "torch: requested with loader='torch'"
    if loader == "dali":
        if not has_dali():
            raise ImportError(f"loader='dali' needs NVIDIA DALI, which is not installed (or does not import: "
                              f"try python -c 'import nvidia.dali.plugin.pytorch'); {DALI_INSTALL_HINT}")
        return "dali", "dali: requested with loader='dali'"
    if not has_dali():
        return "torch", f"torch: auto, nvidia-dali is not installed or does not import ({DALI_INSTALL_HINT} to use it)"
    if device.type == "cuda":
        return "dali", "dali: auto, nvidia-dali is installed and the device is CUDA (JPEG decoding on the GPU)"
    return "dali", ("dali: auto, nvidia-dali is installed; its CPU pipeline delivered 1.7x (train) and 1.6x "
                    "(val) the torchvision DataLoader's images/s at equal workers (docs/data.md)")


def create_loader(root: str | os.PathLike, split: str, *, batch_size: int, image_size: int, loader: str = "auto",
                  workers: int = 2, device: torch.device | str = "cpu", channels_last: bool = False,
                  shard_id: int = 0, num_shards: int = 1, seed: int = 0, drop_last: bool | None = None):
    """Batches of (images, labels) from an ImageNet-layout folder, for one shard of a run.

    ``root`` holds ``train/<class>/*`` and ``val/<class>/*``; ``split`` ("train" or
    "val") picks the folder. Images come out float32, normalized with the ImageNet
    mean / std, shaped (B, 3, image_size, image_size), channels_last memory format
    when asked, on ``device``; labels are int64 class indices into ``loader.classes``
    (sorted folder names).

    Train: RandomResizedCrop(image_size, scale=(0.35, 1)) + horizontal flip, shuffled
    per epoch from seed + epoch identically on every shard (call ``set_epoch``),
    ``drop_last`` defaults to True. Val: shorter side to round(image_size / 0.875),
    center crop; across ``num_shards`` shards every image is seen exactly once and the
    last partial batch is kept.

    ``loader``: "torch" (torchvision DataLoader with ``workers`` processes), "dali"
    (NVIDIA DALI with ``workers`` threads; unreadable files are found by a cached scan
    first) or "auto" (``loader.reason`` says which and why). All argument and layout
    errors are raised here, before any image is decoded.

    The returned object has ``len()`` (batches per epoch), ``set_epoch(epoch)``,
    ``name``, ``reason``, ``classes``, ``num_samples`` (this shard's samples per epoch)
    and ``skipped`` (unreadable files skipped so far).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0 loads in the main process)")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
    device = torch.device(device)
    name, reason = choose_loader(loader, device)
    images = scan_split(root, split)
    if len(images.samples) < num_shards:
        # A shard of no image: its process would evaluate nothing and fail later, far from the cause.
        raise DataLayoutError(f"{images.root} has {len(images.samples)} image(s), fewer than num_shards={num_shards} "
                              f"(one shard per process); add images or run fewer processes")
    if drop_last is None:
        drop_last = split == "train"
    if drop_last and split != "train":
        raise ValueError(f"drop_last=True on split={split!r} would leave validation images unseen; "
                         "leave drop_last unset for validation")
    options = dict(batch_size=batch_size, image_size=image_size, workers=workers, device=device,
                   channels_last=channels_last, shard_id=shard_id, num_shards=num_shards, seed=seed,
                   drop_last=drop_last, reason=reason)
    if name == "dali":
        from anfast.data.dali import DaliLoader

        return DaliLoader(images, split, **options)
    from anfast.data.torch_loader import TorchLoader

    return TorchLoader(images, split, **options)
