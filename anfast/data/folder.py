"""Image folders in the ImageNet layout: find the files, check the layout, shard them.

Both loaders (torchvision and DALI) start from the same scan, so they agree on the
class list, the label of every file and which files a shard owns.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "DataLayoutError",
    "ImageList",
    "class_mismatch",
    "layout_problems",
    "scan_split",
    "shard_indices",
    "val_resize_size",
]

# What DALI's image decoders and PIL both read; other files in a class folder are ignored,
# as torchvision's ImageFolder does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val")
# The standard ImageNet eval recipe: resize the shorter side to size / 0.875, center crop.
VAL_CROP_FRACTION = 0.875

_LAYOUT = "expected <root>/train/<class>/<image> and <root>/val/<class>/<image> (the ImageNet folder layout)"


class DataLayoutError(ValueError):
    """The data folder does not have the layout or content the loaders need."""


@dataclass(frozen=True)
class ImageList:
    """One split of a dataset: sorted class names and (path, label) pairs sorted by path."""

    root: pathlib.Path
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]


def val_resize_size(image_size: int) -> int:
    """Shorter-side size before the validation center crop of ``image_size``."""
    return round(image_size / VAL_CROP_FRACTION)


def scan_split(root: str | os.PathLike, split: str) -> ImageList:
    """List the images of ``root/split`` with labels from their sorted class folders.

    Raises DataLayoutError, naming the path and the fix, when the root or the split
    folder is missing, a class folder holds no image, or there is no class folder.
    """
    if split not in SPLITS:
        raise DataLayoutError(f"split={split!r} is not one of {SPLITS}")
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} does not exist or is not a folder; {_LAYOUT}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataLayoutError(f"{split_dir} is missing; {_LAYOUT}")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataLayoutError(f"{split_dir} has no class folders, so there are no images; {_LAYOUT}")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(entry.path for entry in os.scandir(split_dir / name)
                       if entry.name.lower().endswith(IMAGE_EXTENSIONS) and _is_file(entry))
        if not files:
            raise DataLayoutError(f"class folder {split_dir / name} holds no image "
                                  f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        samples.extend((path, label) for path in files)
    return ImageList(split_dir, classes, samples)


def _is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()``, refusing by name a symlink it cannot follow (a loop), for which
    ``is_file`` raises a bare OSError."""
    try:
        return entry.is_file()
    except OSError as error:
        raise DataLayoutError(f"{entry.path}: {error.strerror}; remove it or point it at an image "
                              f"file") from None


def class_mismatch(train_classes: list[str], val_classes: list[str]) -> str | None:
    """What differs between the class folders of train/ and val/, naming them; None when equal."""
    if list(train_classes) == list(val_classes):
        return None
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    return (f"train/ and val/ hold different class folders (only in train/: {only_train[:10]}, "
            f"only in val/: {only_val[:10]}); both splits need the same classes")


def layout_problems(root: str | os.PathLike) -> list[str]:
    """Every reason the loaders would refuse ``root`` (each split's ``scan_split`` error,
    every empty class folder, a class mismatch), not only the first; empty when usable."""
    problems, classes = [], {}
    for split in SPLITS:
        try:
            scan_split(root, split)
        except DataLayoutError as error:
            problems.append(str(error))
        split_dir = pathlib.Path(root).expanduser() / split
        if not split_dir.is_dir():
            continue
        classes[split] = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
        for name in classes[split]:
            try:  # scan_split's test of an image: a folder named x.jpg is none
                empty = not any(entry.name.lower().endswith(IMAGE_EXTENSIONS) and _is_file(entry)
                                for entry in os.scandir(split_dir / name))
            except DataLayoutError as error:  # a symlink loop
                message = str(error)
            else:
                message = (f"class folder {split_dir / name} holds no image ({', '.join(IMAGE_EXTENSIONS)}); "
                           f"add images or remove the folder") if empty else None
            if message is not None and message not in problems:
                problems.append(message)
    mismatch = class_mismatch(classes["train"], classes["val"]) if len(classes) == len(SPLITS) else None
    return problems + ([mismatch] if mismatch else [])


def shard_indices(num_samples: int, *, shard_id: int, num_shards: int, shuffle: bool, seed: int,
                  epoch: int) -> list[int]:
    """Sample indices one shard visits in one epoch.

    Shuffled (training): DistributedSampler's scheme. Every shard draws the same
    permutation from seed + epoch, pads it by wrapping to a multiple of num_shards and
    takes every num_shards-th index from shard_id, so shards are equal in size.
    Unshuffled (validation): contiguous, unpadded blocks, so across the shards every
    sample is seen exactly once; this is also how DALI's file reader splits a list.
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
        total = math.ceil(num_samples / num_shards) * num_shards
        order += (order * math.ceil(total / num_samples))[: total - num_samples]
        return order[shard_id:total:num_shards]
    start = num_samples * shard_id // num_shards
    stop = num_samples * (shard_id + 1) // num_shards
    return list(range(start, stop))
