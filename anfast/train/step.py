"""One training step that never waits for the device, and what it needs around it.

On a GPU, every ``.item()`` / ``float()`` / ``bool()`` of a device tensor blocks the
host until the queued kernels have run, so it cannot enqueue the next step (its
input copy, its kernels, the optimizer) behind the running one. The trainers anfast
is compared with (NVIDIA DeepLearningExamples, timm) log every N steps for that
reason. Here:

- ``train_step`` leaves the loss, the gradient norm and a non-finite flag on the
  device; ``StepMeter`` sums them there and ``StepMeter.read`` is the only host read,
  which the loop makes every --log-interval steps, at epoch end and at a stop.
- A non-finite step is skipped on the device: the flag is the fused optimizer's
  ``found_inf`` input (the mechanism GradScaler uses), so the weights, the optimizer
  moments, its step count and the weight decay are left as they were, and the EMA
  update is masked by the same flag. The result equals a run whose optimizer and
  EMA never saw that batch. The forward pass did run, so BatchNorm running
  statistics include the batch (as under GradScaler's skipped fp16 steps); a
  non-finite forward therefore poisons them, and the run stops at the next read
  unless --max-bad-steps allows it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch.optim.swa_utils import AveragedModel

from anfast.data.synthetic import synthetic_batch
from anfast.runs.checkpoint import get_rng_state, set_rng_state

__all__ = ["forward_loss", "train_step", "optimizer_step", "ema_update", "StepMeter",
           "resolve_compile", "warm_up"]

LossFn = Callable[[object, torch.Tensor], torch.Tensor]


def forward_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 loss_fn: LossFn, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``loss_fn(model(images), labels)`` under autocast to ``amp_dtype`` (None: full precision)."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        return loss_fn(model(images), labels)


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
               loss_fn: LossFn, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               parameters: Sequence[torch.nn.Parameter], amp_dtype: Optional[torch.dtype],
               clip_grad: Optional[float] = None,
               update_ema: Optional[Callable[[torch.Tensor], None]] = None,
               meter: Optional["StepMeter"] = None,
               more_batches: Iterable[Tuple[torch.Tensor, torch.Tensor]] = (),
               accumulate: int = 1,
               more_optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Forward, backward, clip, optimizer step and EMA update, with no host read.

    ``parameters`` are the trained module's (for the gradient norm); ``update_ema(skip)``
    (e.g. a partial of :func:`ema_update`) follows the step. Under fp16 the GradScaler skips
    steps with inf gradients itself (they are part of finding the scale), so those are
    not counted as bad steps.

    Gradient accumulation: ``more_batches`` yields the step's further micro-batches (read
    one at a time, after the previous one's backward was queued) and ``accumulate`` is
    their number plus one. Each micro-batch's loss counts ``1 / accumulate``, so the
    step's gradient and its logged loss are those of the mean loss over the micro-batches
    (for mean-reduced losses, one step on their concatenation, BatchNorm statistics
    aside). Under DDP only the last micro-batch all-reduces (``no_sync`` before it).

    ``more_optimizers`` train further parameters on the same loss (DAN's architecture
    logits): zeroed, unscaled and stepped with ``optimizer``, skipped by the same flag,
    outside the clipping and the gradient norm.
    """
    optimizers = (optimizer, *more_optimizers)
    for each in optimizers:
        each.zero_grad(set_to_none=True)
    no_sync = getattr(model, "no_sync", None)  # DDP, also through torch.compile's wrapper
    loss_sum = None
    count = 0
    for count, (batch_images, batch_labels) in enumerate(
            itertools.chain([(images, labels)], more_batches), start=1):
        if count > accumulate:
            raise ValueError(f"train_step: more micro-batches than accumulate={accumulate}")
        with (no_sync() if no_sync is not None and count < accumulate else contextlib.nullcontext()):
            loss = forward_loss(model, batch_images, batch_labels, loss_fn, amp_dtype)
            scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if count != accumulate:
        raise ValueError(f"train_step: {count} micro-batch(es), but accumulate={accumulate}")
    loss = loss_sum / accumulate if accumulate > 1 else loss_sum
    for each in optimizers:
        scaler.unscale_(each)
    if clip_grad:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    # Under DDP the gradients are all-reduced, so the flag is the same on every rank: a
    # non-finite loss on one rank makes its gradients, hence everyone's, non-finite.
    bad = torch.logical_not(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if scaler.is_enabled():
        for each in optimizers:
            scaler.step(each)  # fused optimizers take the scaler's found_inf: no host read
        scaler.update()
    else:
        for each in optimizers:
            optimizer_step(each, bad)
    if update_ema is not None:
        update_ema(bad)
    if meter is not None:
        meter.add(loss, grad_norm, bad, counted=not scaler.is_enabled())


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the device flag ``skip`` is set.

    torch's fused SGD / Adam / AdamW take the flag as ``found_inf`` (set as attributes,
    exactly as GradScaler.step does): the kernel leaves parameters and moments alone and
    the step count is taken back, all on the device. An optimizer without that input
    (apex FusedLAMB keeps its step count on the host) needs the flag on the host: one
    read per step, the only path that waits for the device.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():
        optimizer.step()


@torch.no_grad()
def ema_update(ema: AveragedModel, model: torch.nn.Module, skip: torch.Tensor, *,
               decay: float) -> None:
    """``ema.update_parameters(model)`` for an EMA built with ``get_ema_multi_avg_fn(decay)``
    and ``use_buffers=True``: the same numbers, but masked by ``skip`` and without the host
    reads of ``n_averaged`` that AveragedModel makes on every call.

    The first update copies the model, later ones lerp toward it by ``1 - decay``
    (integer and bool buffers are copied: an average of a step counter or of an index
    buffer, truncated as AveragedModel's would be, drifts from every value the model
    held); a skipped update changes nothing, ``n_averaged`` included.
    """
    first = ema.n_averaged == 0
    averaged = list(ema.module.parameters()) + list(ema.module.buffers())
    current = list(model.parameters()) + list(model.buffers())
    floats = [(a, c) for a, c in zip(averaged, current) if torch.is_floating_point(a)]
    # lerp with weight 1 returns the end point exactly, so "copy" is a weight of 1.
    weight = torch.where(skip, 0.0, torch.where(first, 1.0, 1.0 - decay))
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats],
                             [weight] * len(floats))
    for a, c in zip(averaged, current):
        if not torch.is_floating_point(a):
            a.copy_(torch.where(skip, a, c))
    ema.n_averaged += torch.logical_not(skip).to(ema.n_averaged.dtype)


class StepMeter:
    """Sums of the steps of one epoch, kept on the device; ``read`` is the one host read.

    In float64 (counts stay exact; the loss sum equals a host-side float sum of the
    per-step losses): the loss and gradient-norm sums and the number of steps that
    updated the weights this epoch, the run's bad (skipped, non-finite) steps, the global
    step, and the step at which the bad steps first exceeded ``max_bad_steps`` (-1: not).
    """

    _LOSS, _GRAD_NORM, _GOOD, _BAD, _STEP, _FAILED_AT = range(6)

    def __init__(self, device: torch.device, *, max_bad_steps: int, step: int, bad_steps: int = 0,
                 loss_sum: float = 0.0, grad_norm_sum: float = 0.0, good_steps: int = 0):
        self.max_bad_steps = max_bad_steps
        self._sums = torch.empty(6, dtype=torch.float64, device=device)
        self.restart(step=step, bad_steps=bad_steps, loss_sum=loss_sum, grad_norm_sum=grad_norm_sum,
                     good_steps=good_steps)

    def restart(self, *, step: int, bad_steps: int = 0, loss_sum: float = 0.0,
                grad_norm_sum: float = 0.0, good_steps: int = 0) -> None:
        """Start a new epoch's sums in the same device tensor (a captured step keeps
        writing the tensor it was captured with)."""
        values = [loss_sum, grad_norm_sum, good_steps, bad_steps, step, -1]
        self._sums.copy_(torch.tensor(values, dtype=torch.float64))
        self._last_read = {"loss_sum": loss_sum, "grad_norm_sum": grad_norm_sum,
                           "good_steps": good_steps}

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor, *,
            counted: bool = True) -> None:
        """Add one step; a ``bad`` one adds no loss or norm, and counts when ``counted``."""
        zero = torch.zeros((), dtype=torch.float64, device=self._sums.device)
        good = torch.logical_not(bad).double()
        self._sums += torch.stack([torch.where(bad, zero, loss.detach().double()),
                                   torch.where(bad, zero, grad_norm.detach().double()),
                                   good, bad.double() if counted else zero, torch.ones_like(zero),
                                   zero])
        exceeded = (self._sums[self._BAD] > self.max_bad_steps) & (self._sums[self._FAILED_AT] < 0)
        self._sums[self._FAILED_AT] = torch.where(exceeded, self._sums[self._STEP],
                                                  self._sums[self._FAILED_AT])

    def state_tensors(self) -> list:
        """The device tensors ``add`` writes (a captured step restores them after warm-up)."""
        return [self._sums]

    def read(self) -> Dict[str, float]:
        """The sums on the host, plus the mean loss and gradient norm since the last read."""
        loss_sum, grad_norm_sum, good, bad, step, failed_at = self._sums.tolist()
        since = good - self._last_read["good_steps"]
        result = {"loss_sum": loss_sum, "grad_norm_sum": grad_norm_sum, "good_steps": int(good),
                  "bad_steps": int(bad), "step": int(step),
                  "failed_at": None if failed_at < 0 else int(failed_at),
                  "recent_loss": (loss_sum - self._last_read["loss_sum"]) / since if since else None,
                  "recent_grad_norm": ((grad_norm_sum - self._last_read["grad_norm_sum"]) / since
                                       if since else None)}
        self._last_read = {key: result[key] for key in ("loss_sum", "grad_norm_sum", "good_steps")}
        return result


def resolve_compile(mode: Optional[str], device: torch.device) -> Tuple[Optional[str], Optional[str]]:
    """The torch.compile mode to use on ``device`` and, when it differs from the one
    asked for, a one-line message saying why."""
    if mode == "reduce-overhead" and device.type != "cuda":
        return "default", (f"--compile reduce-overhead records CUDA graphs, which need a CUDA "
                           f"device; compiling with mode default on {device}")
    return mode, None


def warm_up(model: torch.nn.Module, loss_fn: LossFn, *, batch_size: int, image_size: int,
            num_classes: int, channels_last: bool, amp_dtype: Optional[torch.dtype],
            device: torch.device) -> None:
    """One eager forward and backward on a random batch of the training shape.

    Run before torch.compile / CUDA-graph capture, so that per-problem decisions (the
    adjoined conv's backend dispatch and its tuning) are made outside the capture. It
    leaves no trace: BatchNorm statistics and every other buffer, the gradients and the
    RNG states are as before, so a compiled run starts from the eager run's state.
    """
    saved_buffers = [buffer.clone() for buffer in model.buffers()]
    saved_rng = get_rng_state()
    images, labels = synthetic_batch(batch_size, image_size, num_classes, device=device,
                                     channels_last=channels_last)
    forward_loss(model, images, labels, loss_fn, amp_dtype).backward()
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), saved_buffers):
            buffer.copy_(saved)
    model.zero_grad(set_to_none=True)
    set_rng_state(saved_rng)
