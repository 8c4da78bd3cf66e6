"""--cuda-graphs: the whole training step captured once as one CUDA graph, then replayed.

A ResNet-50 AN step launches about twice the kernels of a plain step (the students' many
small convolutions and norms); at batch 256 on an H200 many of them are short enough that
the host's launch rate, not the GPU, sets the pace. A replayed graph launches them all
at once. What changes from one step to the next must therefore live in device memory
the graph reads, never in Python values baked into it at capture:

- the batch: copied into static input buffers before each replay (``CapturedStep``);
- the learning rate: a 0-d device tensor in every param group (``tensor_learning_rates``),
  filled in place before each replay; torch's fused SGD / AdamW take a tensor lr;
- the distillation weight lambda: a device tensor the loss multiplies;
- everything the step updates (weights, optimizer moments, BatchNorm running statistics,
  the EMA, the StepMeter's sums) is updated in place by the captured kernels, so it stays
  right across replays. The non-finite-step skip is already on the device (found_inf).

The warm-up that capture needs (torch's recipe: a few steps on a side stream, so lazy
initialisation and cuDNN's algorithm search happen outside the capture) would train on
the first batch; ``undo_warm_up`` saves every tensor the step writes and puts it back
after the warm-up, so a captured run continues exactly where an eager one would. That
includes the state an optimizer creates lazily in its first step (AdamW's moments and
step count on a fresh run): it did not exist before the warm-up, so it is set to the
zeros the optimizer starts it from (Adam's m_0 = v_0 = 0 and t = 0; SGD's momentum
buffers are made as zeros beforehand, anfast.train.build.create_optimizer).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from anfast.runs.checkpoint import get_rng_state, set_rng_state

__all__ = ["CapturedStep", "tensor_learning_rates", "set_learning_rate", "step_state_tensors",
           "undo_warm_up", "cudagraph_skips"]


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every param group's lr a 0-d float32 tensor on ``device`` (fused optimizers
    read it on the device, so a captured step sees each new value), and make optimizers
    that have the flag (Adam, AdamW) ``capturable``: their step refuses a capture otherwise.
    Set here, not at construction, so a run resumed with --cuda-graphs gets it too."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        if "capturable" in group:
            group["capturable"] = True


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr: in place where it is a tensor (no new allocation, no host
    wait), as a float otherwise."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def step_state_tensors(*holders) -> List[torch.Tensor]:
    """Every tensor a training step may write, of modules (parameters, buffers),
    optimizers (their state and tensor lrs), and objects with ``state_tensors()``."""
    tensors: List[torch.Tensor] = []
    for holder in holders:
        if holder is None:
            continue
        if isinstance(holder, torch.nn.Module):
            tensors += list(holder.parameters()) + list(holder.buffers())
        elif isinstance(holder, torch.optim.Optimizer):
            tensors += [v for state in holder.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor)]
            tensors += [g["lr"] for g in holder.param_groups if isinstance(g["lr"], torch.Tensor)]
        else:
            tensors += list(holder.state_tensors())
    unique = {id(t): t for t in tensors}
    return list(unique.values())


def undo_warm_up(warm_up: Callable[[], None], state: Callable[[], Sequence[torch.Tensor]]) -> None:
    """Run ``warm_up``, then put back every tensor of ``state()`` and the RNG states.

    ``state`` is called before and after the warm-up: a tensor of both calls gets its value
    from before; one that only the second call returns was created by the warm-up (an
    optimizer's lazily made moments and step count) and is zeroed, the value that
    torch's SGD (momentum) and Adam / AdamW start their state from.
    """
    before = list(state())  # kept alive, so an id() below names one tensor
    saved = {id(t): t.detach().clone() for t in before}
    saved_rng = get_rng_state()
    warm_up()
    with torch.no_grad():
        for tensor in state():
            if id(tensor) in saved:
                tensor.copy_(saved[id(tensor)])
            else:
                tensor.zero_()
    set_rng_state(saved_rng)


def cudagraph_skips() -> int:
    """How many compiled graphs torch.compile(mode="reduce-overhead") has run without a CUDA
    graph in this process: inductor skips those that mutate their inputs (BatchNorm's
    running statistics under some versions), copy to the CPU, or have dynamic shapes, and
    says so only under TORCH_LOGS=perf_hints."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


class CapturedStep:
    """``step(images, labels)`` captured as one CUDA graph; call it like ``step``.

    Args:
        step: one whole training step on (images, labels): forward, backward, optimizer,
            EMA, meter; it must make no host read (anfast.train.step.train_step makes none)
            and read what changes between steps from device tensors (see the module doc).
        images, labels: a batch of the training shape, dtype, device and memory format.
        state: returns every tensor ``step`` writes (``step_state_tensors`` of the model,
            optimizer, ...); called before and after the warm-up, whose changes to them
            are undone before capture (``undo_warm_up``).
        warmup_steps: eager steps on a side stream before capture (torch's recipe).
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], images: torch.Tensor,
                 labels: torch.Tensor, *, state: Callable[[], Sequence[torch.Tensor]],
                 warmup_steps: int = 3):
        if images.device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device; the batch is on {images.device}")
        self.images = torch.empty_like(images)
        self.labels = torch.empty_like(labels)
        self.images.copy_(images)
        self.labels.copy_(labels)
        device = images.device

        def warm_up() -> None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    step(self.images, self.labels)
            torch.cuda.current_stream(device).wait_stream(side)

        undo_warm_up(warm_up, state)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may call CUDA during the capture,
        # which the default ("global") mode turns into a capture error.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            step(self.images, self.labels)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Copy the batch into the graph's inputs and replay the step (no host wait)."""
        if images.shape != self.images.shape or labels.shape != self.labels.shape:
            raise ValueError(f"--cuda-graphs: a batch of {tuple(images.shape)} images, but the graph "
                             f"was captured for {tuple(self.images.shape)}; the loader must drop "
                             f"the last partial batch (it does for training)")
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()
