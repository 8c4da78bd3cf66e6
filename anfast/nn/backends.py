"""Setting and tuning the conv backends of a whole model (``anfast tune``'s library half).

One forward pass at the run's batch size, image size, AMP dtype and memory format
records every problem the adjoined conv op meets (the backward pass meets the same
keys: a key includes which gradients are needed). Each problem is then verified and
timed by anfast.ops.tuning, which fills the cache that auto reads in training;
``prepare_backends`` does that before a run's first step, pins the decisions that
have a traceable form (anfast.ops.conv.TRACEABLE_BACKENDS) and decides the
evaluation's no-gradient keys of the layers left with auto.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from anfast.nn import AdjoinedConv2d
from anfast.nn.modes import eval_mode
from anfast.ops import dispatch, tuning
from anfast.ops.conv import TRACEABLE_BACKENDS
from anfast.ops.backend import ConvProblem

__all__ = ["collect_layer_problems", "tune_model", "set_backend", "layer_backends",
           "prepare_backends", "pin_traceable_decisions", "LayerDecision"]


def set_backend(model: torch.nn.Module, backend: str) -> None:
    """Run every adjoined conv of ``model`` on ``backend``; "auto" leaves the choice to
    $ANFAST_BACKEND, else auto."""
    for module in model.modules():
        if isinstance(module, AdjoinedConv2d):
            module.backend = None if backend == "auto" else backend


def _example_batch(model: torch.nn.Module, batch_size: int, image_size: int) -> torch.Tensor:
    weight = next(p for p in model.parameters() if p.dim() == 4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=weight.device)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def collect_layer_problems(model: torch.nn.Module, batch_size: int, image_size: int,
                           amp_dtype: Optional[torch.dtype], *, gradients: bool = True,
                           ) -> List[tuple[str, ConvProblem, str]]:
    """(layer name, problem, backend that ran it) of every adjoined conv call of one
    forward pass on random images shaped like the run's batches.

    The model runs in eval mode (BatchNorm statistics stay untouched) with gradients
    enabled, so each problem's key says which gradients training needs; with
    ``gradients=False`` it runs under no_grad, as an evaluation does, and the keys need
    none. A conv module with several fused passes (nested students) names them
    ``layer#1``, ``layer#2``.
    """
    images = _example_batch(model, batch_size, image_size)
    named: List[tuple[str, ConvProblem, str]] = []
    first_record: Dict[str, int] = {}

    def label(name):
        def pre_hook(module, args):
            first_record[name] = len(records)

        def hook(module, args, output):
            calls = [r for r in records[first_record[name]:] if r[1] == "forward"]
            for index, (problem, _, backend) in enumerate(calls):
                named.append((name if len(calls) == 1 else f"{name}#{index + 1}", problem, backend))
        return pre_hook, hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, AdjoinedConv2d):
            pre_hook, hook = label(name)
            handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]
    try:
        with eval_mode(model), dispatch.recording() as records, torch.set_grad_enabled(gradients), torch.autocast(
                images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return named


@dataclass
class LayerDecision:
    """One row of the tune table."""

    layer: str
    problem: ConvProblem
    decision: tuning.Decision
    cached: bool

    def chosen_ms(self) -> float:
        choice = self.decision.backend
        return self.decision.torch_ms if choice == "torch" else self.decision.candidates[choice].ms

    def to_dict(self) -> Dict[str, Any]:
        p = self.problem
        return {"layer": self.layer, "key": tuning.problem_key(p),
                "x_base": list(p.x_base.shape), "x_student": list(p.x_student.shape),
                "weight": list(p.weight.shape), "out_student": p.out_student,
                "stride": list(p.stride), "padding": list(p.padding),
                "choice": self.decision.backend, "variant": self.decision.variant,
                "reason": self.decision.reason,
                "torch_ms": self.decision.torch_ms, "chosen_ms": self.chosen_ms(),
                "speedup": self.decision.torch_ms / self.chosen_ms(),
                "candidates": self.decision.to_json()["candidates"], "cached": self.cached}


def tune_model(model: torch.nn.Module, batch_size: int, image_size: int,
               amp_dtype: Optional[torch.dtype], candidates: Optional[Sequence[str]] = None,
               explicit: bool = False, force: bool = False, layers: str = "*",
               on_row: Optional[Callable[[LayerDecision], None]] = None) -> List[LayerDecision]:
    """Decide auto's backend for every adjoined conv of ``model`` at this batch shape
    (those whose name matches the glob ``layers``), with tuning's progress bar where stderr
    is a terminal; ``on_row(row)`` is called with each layer's row as it is decided.

    A collective in a distributed run (every rank calls it; all get rank 0's decisions).
    """
    layers = [layer for layer in collect_layer_problems(model, batch_size, image_size, amp_dtype)
              if fnmatch.fnmatchcase(layer[0], layers)]

    def decided(index: int, decision: tuning.Decision, cached: bool) -> None:
        name, problem, _ = layers[index]
        on_row(LayerDecision(name, problem, decision, cached))

    results = tuning.tune_problems([problem for _, problem, _ in layers], candidates, explicit,
                                   force, on_decided=decided if on_row is not None else None)
    return [LayerDecision(name, problem, decision, cached)
            for (name, problem, _), (decision, cached) in zip(layers, results)]


def layer_backends(model: torch.nn.Module, batch_size: int, image_size: int,
                   amp_dtype: Optional[torch.dtype]) -> Dict[str, str]:
    """{layer: backend} that each adjoined conv of ``model`` runs at this batch shape now."""
    return {name: backend for name, _, backend in
            collect_layer_problems(model, batch_size, image_size, amp_dtype)}


def prepare_backends(model: torch.nn.Module, backend: str, batch_size: int, image_size: int,
                     amp_dtype: Optional[torch.dtype]) -> None:
    """What `anfast train` does before its first step: set every layer's backend and,
    for auto on a GPU, tune the model's problems now (a collective under torchrun), so
    the ranks agree and the first epoch's throughput does not include the tuning.

    Evaluation runs under no_grad, and a problem that needs no gradients has a key of
    its own: for the layers auto keeps (those not pinned to a traceable backend), those
    keys are decided now as well, so an evaluation never stops to tune and, under
    torchrun, runs the agreed decisions rather than torch.

    With ANFAST_TUNE=0 nothing is measured: the cached decisions are read, and a conv
    with none runs torch, as auto would run it."""
    set_backend(model, backend)
    device = next(model.parameters()).device
    if backend != "auto" or device.type not in tuning.get_tuner().lazy_devices:
        return
    if tuning.tuning_off():  # what each conv runs now: its cached decision, else torch
        pin_traceable_decisions(model, layer_backends(model, batch_size, image_size, amp_dtype))
        return
    rows = tune_model(model, batch_size, image_size, amp_dtype)
    pinned = set(pin_traceable_decisions(model, {row.layer: row.decision.backend for row in rows}))
    # The same on every rank (rank 0's decisions pinned them), so the collective below is
    # called by all ranks or by none.
    evaluation = [problem for layer, problem, _ in
                  collect_layer_problems(model, batch_size, image_size, amp_dtype, gradients=False)
                  if layer.split("#")[0] not in pinned]
    if evaluation:
        tuning.tune_problems(evaluation)


def pin_traceable_decisions(model: torch.nn.Module, chosen: Dict[str, str]) -> List[str]:
    """Fix the backend of every adjoined conv whose passes (``chosen``: {layer or
    "layer#pass": backend}) auto decided alike for a backend with a traceable form
    (torch: aten convolutions), so torch.compile and CUDA graphs see plain aten ops there
    instead of the custom op that would decide again on every call (DESIGN.md section 4c,
    decide then trace). Returns the names of the pinned layers."""
    by_layer: Dict[str, set] = {}
    for layer, backend in chosen.items():
        by_layer.setdefault(layer.split("#")[0], set()).add(backend)
    pinned = []
    for name, module in model.named_modules():
        names = by_layer.get(name, set())
        if isinstance(module, AdjoinedConv2d) and len(names) == 1 and names <= TRACEABLE_BACKENDS.keys():
            module.backend = next(iter(names))
            pinned.append(name)
    return pinned
