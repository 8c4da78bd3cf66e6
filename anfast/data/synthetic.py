"""--data synthetic: one random batch made once on the device, yielded every step.

NVIDIA DeepLearningExamples' synthetic backend for measuring compute throughput: no
files, no decode, no host-to-device copy, so a run measures the model, the loss and
the optimizer alone. The images are standard-normal noise (already "normalized") and
the labels uniform over ``num_classes``: accuracy on them means nothing.
"""

from __future__ import annotations

import torch

__all__ = ["SyntheticLoader", "synthetic_batch", "DEFAULT_SYNTHETIC_CLASSES"]

DEFAULT_SYNTHETIC_CLASSES = 1000  # ImageNet's, so the classifier costs what it costs there


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, *, device: torch.device,
                    channels_last: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) ~ N(0, 1) in float32 and int64 labels in [0, num_classes), drawn
    on ``device`` from a private generator (the global RNG streams are left alone)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), device=device, generator=generator)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.contiguous(memory_format=memory_format), labels


class SyntheticLoader:
    """``steps`` batches per epoch, all the same tensors, with the loader interface of
    :func:`anfast.data.create_loader` (len, set_epoch, name, reason, classes,
    num_samples, skipped). Each shard draws its own batch (from seed * 1000 + shard)."""

    name = "synthetic"

    def __init__(self, *, steps: int, batch_size: int, image_size: int, num_classes: int,
                 device: torch.device, channels_last: bool = False, seed: int = 0, shard_id: int = 0):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps = steps
        self.classes = [f"class_{index}" for index in range(num_classes)]
        self.num_samples = steps * batch_size
        self.skipped = 0
        self.reason = (f"synthetic: one random batch of {batch_size} x 3 x {image_size} x "
                       f"{image_size} made once on {device}, {num_classes} classes")
        self._batch = synthetic_batch(batch_size, image_size, num_classes, device=torch.device(device),
                                      channels_last=channels_last, seed=seed * 1000 + shard_id)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle: every epoch yields the same batch."""

    def __iter__(self):
        for _ in range(self.steps):
            yield self._batch
