"""Learning-rate schedule: linear warmup, then cosine decay, per optimizer step."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float,
          min_lr: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup ramps linearly to ``base_lr`` over ``warmup_steps`` (step 0 already gets
    base_lr / warmup_steps, never 0, so no step is wasted); cosine then falls to
    ``min_lr`` at the last step.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
