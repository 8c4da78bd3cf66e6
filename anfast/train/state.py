"""``RunState``: what a run has done so far, in one dataclass that fit() passes around.

Everything a resumed run needs to continue as if never stopped, and nothing it can
rebuild: the counters, the best student so far, the epoch history, and the sums of
the epoch in progress (they cover the part of it done before a mid-epoch stop). A
checkpoint stores the fields flat, next to the weights and optimizer states, so
checkpoints written before this class existed load unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

__all__ = ["RunState"]


@dataclass
class RunState:
    """The counters, sums and history of one run (see the module docstring)."""

    epoch: int = 0                 # epochs finished
    batches_done: int = 0          # loader batches of the current epoch already trained on
    step: int = 0                  # optimizer steps, over the whole run
    best_student_top1: float = -1.0
    history: List[Dict[str, Any]] = field(default_factory=list)  # one metrics row per epoch
    train_images: int = 0          # over finished epochs, all processes
    train_seconds: float = 0.0     # over finished epochs
    wall_time_s: float = 0.0       # of the processes before this one (resumed runs)
    epoch_loss_sum: float = 0.0    # the current epoch's sums, as last read from the StepMeter
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    epoch_grad_norm_sum: float = 0.0
    epoch_good_steps: int = 0
    bad_steps: int = 0             # skipped non-finite steps, over the whole run

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "RunState":
        """The state a checkpoint saved; a field it lacks (an older checkpoint) starts at its default."""
        saved = {f.name: checkpoint[f.name] for f in dataclasses.fields(cls) if f.name in checkpoint}
        return cls(**saved)

    def to_checkpoint(self) -> Dict[str, Any]:
        """The fields as plain values, to merge into a checkpoint."""
        return dataclasses.asdict(self)

    def meter_sums(self) -> Dict[str, Any]:
        """The StepMeter's starting values for the rest of the current epoch."""
        return dict(step=self.step, bad_steps=self.bad_steps, loss_sum=self.epoch_loss_sum,
                    grad_norm_sum=self.epoch_grad_norm_sum, good_steps=self.epoch_good_steps)

    def take_meter_read(self, values: Dict[str, Any]) -> None:
        """Keep a StepMeter.read's sums (the current epoch's and the run's bad steps)."""
        self.epoch_loss_sum = values["loss_sum"]
        self.epoch_grad_norm_sum = values["grad_norm_sum"]
        self.epoch_good_steps = values["good_steps"]
        self.bad_steps = values["bad_steps"]

    def mean_epoch_loss(self) -> float:
        return self.epoch_loss_sum / max(1, self.epoch_good_steps)

    def mean_epoch_grad_norm(self) -> float:
        return self.epoch_grad_norm_sum / max(1, self.epoch_good_steps)

    def finish_epoch(self, row: Dict[str, Any]) -> bool:
        """Record the epoch's metrics ``row`` and start the next epoch's sums; True when its
        student is the best so far (``row["student"]["top1"]``, when the row has one)."""
        self.history.append(row)
        self.train_images += self.epoch_images
        self.train_seconds += self.epoch_seconds
        self.epoch += 1
        self.batches_done = 0
        self.epoch_loss_sum = 0.0
        self.epoch_images = 0
        self.epoch_seconds = 0.0
        self.epoch_grad_norm_sum = 0.0
        self.epoch_good_steps = 0
        top1 = row["student"]["top1"] if "student" in row else None
        if top1 is None or top1 <= self.best_student_top1:
            return False
        self.best_student_top1 = top1
        return True
