"""NVIDIA DALI input pipelines behind the same loader interface as the torch path.

Imported only when a DALI loader is built: the package imports and trains without
DALI. On a CUDA device the JPEG decode runs on the GPU ("mixed" decoder: Huffman on
the CPU, IDCT and everything after on the GPU); on the CPU the whole pipeline runs on
DALI's CPU thread pool (``device_id=None``).

Sharding and epochs, both done by DALI's file reader over the scanned file list:

- train: ``shuffle_after_epoch`` reshuffles the whole list every epoch with one seed,
  identical on every rank, and each rank reads its contiguous block of it, so the
  ranks' samples are disjoint (DistributedSampler-like). ``pad_last_batch`` pads every
  shard to the same multiple of the batch size and ``LastBatchPolicy.DROP`` drops the
  incomplete last batch, so every rank runs the same number of steps and the reader
  ends each epoch exactly at its shard boundary.
- val: no shuffle, ``stick_to_shard``, ``pad_last_batch`` and
  ``LastBatchPolicy.PARTIAL``: rank i always reads block i of the list, the reader pads
  the last batch by repeating its last sample and the iterator cuts the padding off,
  so across ranks every image is seen exactly once and the partial batch is kept.

Epoch order is a function of (seed, epoch) alone, as in the torch loader:
``set_epoch(e)`` on a training loader rebuilds the pipeline with shuffle seed
``seed + e`` (DALI shuffles before the first epoch too), so a resumed run replays
exactly the order an uninterrupted run drew, on every rank. A rebuild costs
milliseconds on the CPU and about a pipeline start on a GPU, once per epoch.
Without set_epoch calls, DALI's own reshuffle after each epoch applies.
"""

from __future__ import annotations

import warnings

import torch

from anfast.data.check import find_unreadable
from anfast.data.folder import IMAGENET_MEAN, IMAGENET_STD, DataLayoutError, ImageList, val_resize_size

__all__ = ["DaliLoader", "build_pipeline"]

_READER = "Reader"
# torchvision's RandomResizedCrop defaults, so both loaders draw the same crops.
_CROP_ASPECT = (3 / 4, 4 / 3)
_CROP_AREA = (0.35, 1.0)
# Batches prepared ahead of the one in use (DALI's default, stated so it is a choice):
# one more 256 x 224 x 224 float batch costs 154 MB of device memory; unmeasured gain.
PREFETCH_QUEUE_DEPTH = 2


def _torchvision_center_crop_geometry(height, width, shorter: int, crop: int):
    """Resize(shorter) + CenterCrop(crop) sizes exactly as torchvision computes them, on DALI nodes.

    DALI's own resize_shorter rounds the longer side (90x60 -> 41x27) where torchvision
    truncates (40x27), and its centred crop rounds a half-pixel offset up where
    torchvision rounds half to even; either alone shifts the crop by a pixel and moves
    the validation pixels by several grey levels. Returns ((h, w), (pos_y, pos_x)) with
    the positions normalized the way crop_mirror_normalize expects.
    """
    from nvidia.dali import math

    short_side = math.min(height, width)
    resized = tuple(math.floor(shorter * side / short_side) for side in (height, width))
    positions = []
    for side in resized:
        slack = side - crop
        half = math.floor(slack / 2)
        # Python's round(slack / 2): an odd slack goes to the even neighbour of slack / 2.
        odd = slack - 2 * half
        anchor = half + odd * (half - 2 * math.floor(half / 2))
        positions.append(anchor / math.max(slack, 1))
    return resized, tuple(positions)


def build_pipeline(paths: list[str], labels: list[int], split: str, *, batch_size: int, image_size: int,
                   num_threads: int, device_id: int | None, shard_id: int, num_shards: int, seed: int,
                   epoch: int, channels_last: bool):
    """A built DALI pipeline yielding (images, labels) for one shard; ``device_id=None`` runs on the CPU.

    The file order starts from shuffle seed ``seed + epoch`` (identical on all shards);
    augmentation draws differ per shard and per epoch.

    Images are float32, ImageNet-normalized, CHW per sample (HWC when
    ``channels_last``, which the loader views as NCHW with channels-last strides).
    """
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"
    layout = "HWC" if channels_last else "CHW"
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    train = split == "train"

    augmentation_seed = hash((seed, epoch, shard_id)) % 2**31

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=augmentation_seed,
                  prefetch_queue_depth=PREFETCH_QUEUE_DEPTH)
    def pipeline():
        order = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed + epoch) if train \
            else dict(stick_to_shard=True)
        encoded, label = fn.readers.file(files=paths, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                         pad_last_batch=True, name=_READER, **order)
        if train:
            images = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                                   adjust_orientation=False, random_area=list(_CROP_AREA),
                                                   random_aspect_ratio=list(_CROP_ASPECT), num_attempts=10)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean,
                                              std=std, mirror=fn.random.coin_flip(probability=0.5))
        else:
            height_width = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.FLOAT)
            resized, crop_position = _torchvision_center_crop_geometry(
                height_width[0], height_width[1], val_resize_size(image_size), image_size)
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB,
                                       adjust_orientation=False)
            images = fn.resize(images, resize_y=resized[0], resize_x=resized[1])
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean,
                                              std=std, crop=(image_size, image_size),
                                              crop_pos_y=crop_position[0], crop_pos_x=crop_position[1])
        # Labels go to the GPU inside the pipeline, so the loop never copies them from pageable memory.
        return images, label if device_id is None else label.gpu()

    built = pipeline()
    built.build()
    return built


class DaliLoader:
    """Batches of (images, labels) from a DALI pipeline over an ImageList.

    See :func:`anfast.data.create_loader` for the meaning of the arguments; ``workers``
    is the DALI thread count.
    """

    name = "dali"

    def __init__(self, images: ImageList, split: str, *, batch_size: int, image_size: int, workers: int,
                 device: torch.device, channels_last: bool, shard_id: int, num_shards: int, seed: int,
                 drop_last: bool, reason: str):
        self.classes = images.classes
        self.device = device
        self.channels_last = channels_last
        self.batch_size = batch_size
        self._split = split
        self._drop_last = drop_last
        scan = find_unreadable(images.paths, workers=max(1, workers))
        self.skipped = len(scan.bad)
        self.dropped = scan.bad
        if scan.bad:
            listing = "\n  ".join(f"{path}: {why}" for path, why in sorted(scan.bad.items()))
            warnings.warn(f"anfast: DALI loader drops {len(scan.bad)} unreadable image(s) of {scan.num_files} "
                          f"under {images.root}:\n  {listing}", RuntimeWarning, stacklevel=3)
        samples = [(path, label) for path, label in images.samples if path not in scan.bad]
        if len(samples) < num_shards:
            raise DataLayoutError(f"{images.root} has {len(samples)} readable image(s), fewer than "
                                  f"num_shards={num_shards}")
        self._paths = [path for path, _ in samples]
        self._labels = [label for _, label in samples]
        self.reason = reason
        if device.type == "cuda":
            self._device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self._device_id = None
        self._options = dict(batch_size=batch_size, image_size=image_size, num_threads=max(1, workers),
                             device_id=self._device_id, shard_id=shard_id, num_shards=num_shards, seed=seed,
                             channels_last=channels_last)
        if drop_last and self._shard_size() < batch_size:
            # DALI's reader would fail inside the pipeline ("no data in the pipeline").
            raise DataLayoutError(f"{images.root} has {self._shard_size()} images per process, fewer "
                                  f"than one batch of {batch_size}; lower --batch-size")
        self._iterator = None
        self._build(epoch=0)

    def _build(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._iterator = None  # release the old pipeline's threads and buffers first
        pipeline = build_pipeline(self._paths, self._labels, self._split, epoch=epoch, **self._options)
        policy = LastBatchPolicy.DROP if self._drop_last else LastBatchPolicy.PARTIAL
        self._iterator = DALIGenericIterator([pipeline], ["images", "labels"], reader_name=_READER,
                                             last_batch_policy=policy, auto_reset=True)
        self.num_samples = self._iterator.size if self._drop_last else self._shard_size()
        self._epoch = epoch
        self._fresh = True
        self._mid_epoch = False

    def _shard_size(self) -> int:
        total, shard_id, num_shards = len(self._paths), self._options["shard_id"], self._options["num_shards"]
        return total * (shard_id + 1) // num_shards - total * shard_id // num_shards

    def __len__(self) -> int:
        return len(self._iterator)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``: the order follows from seed + epoch, identical on every shard."""
        reshuffle = self._split == "train" and (epoch != self._epoch or not self._fresh)
        if reshuffle or self._mid_epoch:
            self._build(epoch)
        self._epoch = epoch

    def __iter__(self):
        if self._mid_epoch:
            # DALI cannot rewind an iterator in the middle of an epoch: start it again.
            self._build(self._epoch)
        self._fresh = False
        self._mid_epoch = True
        for batch in self._iterator:
            images = batch[0]["images"]
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last strides
            labels = batch[0]["labels"].reshape(-1).long()
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        self._mid_epoch = False
        self._epoch += 1
