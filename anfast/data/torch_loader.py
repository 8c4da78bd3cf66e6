"""The torchvision DataLoader path: PIL decode, torchvision transforms, worker processes.

An unreadable file (truncated JPEG, a text file named .jpg) must not end an epoch
that may be hours old: the dataset returns None for it, the collate function drops it
and hands its path back to the main process, which warns once per file and counts
each distinct file in ``loader.skipped`` (``loader.dropped`` maps it to the reason).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import warnings

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from anfast.data.check import require_a_readable_image, to_rgb
from anfast.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageList, shard_indices, val_resize_size

__all__ = ["TorchLoader", "build_transform", "load_rgb"]

# What PIL raises for a file it cannot decode: OSError (truncated data, unidentified
# format), SyntaxError / ValueError (malformed headers), DecompressionBombError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` to 8-bit RGB the way DALI's image decoder does (see ``to_rgb``)."""
    with Image.open(path) as image:
        return to_rgb(image)


def build_transform(split: str, image_size: int) -> transforms.Compose:
    """torchvision transforms for ``split``: the ImageNet train / eval recipes, normalized."""
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if split == "train":
        return transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
                                   transforms.RandomHorizontalFlip(), *normalize])
    return transforms.Compose([transforms.Resize(val_resize_size(image_size)),
                               transforms.CenterCrop(image_size), *normalize])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``: a function of these alone."""
    return hash((seed, epoch, index)) % 2**63  # int tuples hash the same in every process


class _ImageFiles(Dataset):
    """Keys are (sample index, epoch) from _ShardSampler. Each sample's random crop and flip
    are drawn from its own generator seeded by (seed, epoch, index), so they do not depend
    on the worker count, on which worker loads it, or on where a resumed run restarted:
    persistent workers cannot be reseeded per epoch, but a key can carry the epoch."""

    def __init__(self, samples: list[tuple[str, int]], transform: transforms.Compose, seed: int):
        self.samples = samples
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except _DECODE_ERRORS as error:
            return None, label, (path, f"{type(error).__name__}: {error}")
        # torchvision's transforms draw from the CPU's global generator; forking keeps the
        # caller's stream (the training process's, when workers=0) untouched. Only that
        # generator is seeded: torch.manual_seed would also reseed every CUDA generator
        # (dropout, DAN's Gumbel noise) from the last sample's index, and leave it so.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label, None


_STOPS = {signal.SIGTERM, signal.SIGINT}


def _leave_stops_to_the_main_process(worker_id: int, *, main_pid: int) -> None:
    """Loader workers obey SIGTERM / SIGINT from their training process only.

    A batch scheduler's SIGTERM (or Ctrl-C) reaches the whole process group: a worker
    that died of it made the next batch fail with "DataLoader worker ... is killed by
    signal" before the training process could save. So the workers leave stops to the
    training process, which stops between two steps and ends its workers itself.

    Ignoring the signals outright (SIG_IGN) hung the run instead: at exit,
    multiprocessing ends daemonic children with SIGTERM and then joins them, and a
    worker that ignores SIGTERM is joined forever. A worker therefore keeps both
    signals blocked (it was forked with them blocked, see :func:`_stops_held_back`) and
    takes them on a thread of its own, which reads the sender of each: one from the
    training process (torch's and multiprocessing's ``terminate()``) ends the worker at
    once, any other is dropped. Workers also exit when the training process dies
    (torch's worker watchdog).
    """
    # Threads inherit the mask: every thread the worker starts later blocks them too,
    # so they stay pending until the waiting thread takes them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    threading.Thread(target=_obey_only, args=(main_pid,), name="anfast-worker-signals",
                     daemon=True).start()


def _obey_only(main_pid: int) -> None:
    while True:
        received = signal.sigwaitinfo(_STOPS)
        if received.si_pid == main_pid:
            os._exit(128 + received.si_signo)  # what a shell reports for death by that signal


@contextlib.contextmanager
def _stops_held_back():
    """Block SIGTERM / SIGINT in this thread while it forks loader workers.

    A forked worker inherits the mask, so a signal that reaches the process group
    before the worker's own handling is in place stays pending instead of killing it
    (torch installs a SIGTERM handler that dies at the start of every worker). Signals
    sent to the training process meanwhile are delivered when the mask is restored.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _collate_skipping(batch):
    kept = [(image, label) for image, label, _ in batch if image is not None]
    bad = [problem for _, _, problem in batch if problem is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, bad


class _ShardSampler(Sampler[tuple[int, int]]):
    def __init__(self, num_samples: int, *, shard_id: int, num_shards: int, shuffle: bool, seed: int):
        self.num_samples = num_samples
        self.shard_id, self.num_shards = shard_id, num_shards
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.length = len(list(iter(self)))

    def __iter__(self):
        indices = shard_indices(self.num_samples, shard_id=self.shard_id, num_shards=self.num_shards,
                                shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return self.length


class TorchLoader:
    """Batches of (images, labels) from a torchvision DataLoader over an ImageList.

    See :func:`anfast.data.create_loader` for the meaning of the arguments.
    """

    name = "torch"

    def __init__(self, images: ImageList, split: str, *, batch_size: int, image_size: int, workers: int,
                 device: torch.device, channels_last: bool, shard_id: int, num_shards: int, seed: int,
                 drop_last: bool, reason: str):
        require_a_readable_image(images)
        self.classes = images.classes
        self.reason = reason
        self.skipped = 0
        self.dropped: dict[str, str] = {}
        self.device = device
        self.channels_last = channels_last
        self._sampler = _ShardSampler(len(images.samples), shard_id=shard_id, num_shards=num_shards,
                                      shuffle=split == "train", seed=seed)
        self.num_samples = len(self._sampler)
        self._loader = DataLoader(
            _ImageFiles(images.samples, build_transform(split, image_size), seed),
            batch_size=batch_size, sampler=self._sampler, num_workers=workers,
            collate_fn=_collate_skipping, drop_last=drop_last, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=functools.partial(_leave_stops_to_the_main_process, main_pid=os.getpid()))

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``: the order follows from seed + epoch, identical on every shard."""
        self._sampler.epoch = epoch

    def __iter__(self):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        with _stops_held_back():  # the first iter() forks the (persistent) workers
            batches = iter(self._loader)
        for images, labels, bad in batches:
            self._count_skipped(bad)
            if labels.numel() == 0:
                continue
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            yield images, labels.to(self.device, non_blocking=True)

    def _count_skipped(self, problems: list[tuple[str, str]]) -> None:
        for path, reason in problems:
            if path not in self.dropped:
                self.dropped[path] = reason
                warnings.warn(f"anfast: skipped unreadable image {path}: {reason}", RuntimeWarning, stacklevel=3)
        self.skipped = len(self.dropped)
