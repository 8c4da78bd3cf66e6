"""The Adjoined Networks objective and its lambda schedules (DESIGN.md section 2).

    L = CE(y, z_b) + lambda * sum_s T^2 * KL(softmax(z_b / T) || softmax(z_s / T))

Defaults are the authors': T = 1, no student CE term, and no stop-gradient, so the
KL term also trains the base ("regularizes the teacher").
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdjoinedLoss", "OneNetworkLoss", "TaughtOutput", "distillation_loss", "paper_lambda", "linear_lambda", "constant_lambda", "get_lambda_schedule"]


def _check_range(name: str, value: float, low: float, high: float = math.inf, *,
                 low_included: bool = True, fix: str = "") -> None:
    """Refuse ``value`` unless it is finite and in [low, high] ((low, high] without
    ``low_included``): a NaN passes every comparison, so each bound alone lets it through."""
    above_low = value >= low if low_included else value > low
    if not (math.isfinite(value) and above_low and value <= high):
        bounds = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name}={value}: must be a finite number in {bounds}{fix}")


def _check_progress(progress: float) -> None:
    _check_range("progress", progress, 0.0, 1.0, fix="; pass the fraction of training done, e / E")


def _check_label_smoothing(label_smoothing: float) -> None:
    _check_range("label_smoothing", label_smoothing, 0.0, 1.0, fix=" (what F.cross_entropy takes)")


def _check_temperature(temperature: float) -> None:
    _check_range("temperature", temperature, 0.0, low_included=False)


def paper_lambda(progress: float) -> float:
    """The authors' ramp min(4 (e / E)^2, 1); ``progress`` is e / E (per epoch or per step), in [0, 1]."""
    _check_progress(progress)
    return min(4.0 * progress**2, 1.0)


def linear_lambda(progress: float) -> float:
    """A linear ramp reaching 1 halfway through training; ``progress`` in [0, 1]."""
    _check_progress(progress)
    return min(2.0 * progress, 1.0)


def constant_lambda(progress: float) -> float:
    """lambda = 1 throughout; ``progress`` in [0, 1]."""
    _check_progress(progress)
    return 1.0


_SCHEDULES = {"paper": paper_lambda, "linear": linear_lambda, "constant": constant_lambda}


def get_lambda_schedule(name: str) -> Callable[[float], float]:
    """The schedule called ``name``: one of paper, linear, constant."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown lambda schedule {name!r}; choose one of {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name]


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Softmax and KL of bf16 / fp16 logits lose too much: compute them in fp32 at least."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _check_logits(name: str, logits: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """Classification logits (batch, classes), shaped like ``reference``'s: other shapes would
    broadcast in the KL, and (N, C, H, W) maps would take the CE over dim 1 but the KL over W.
    Reads shapes only, never values (no host sync)."""
    if reference.dim() != 2:
        raise ValueError(f"{reference_name} logits of shape {tuple(reference.shape)}: must be 2-D "
                         "(batch, classes); for dense predictions, move the classes last and flatten the rest")
    if logits.shape != reference.shape:
        raise ValueError(f"{name} logits of shape {tuple(logits.shape)}: must have the "
                         f"{reference_name}'s shape {tuple(reference.shape)}")


class AdjoinedLoss(nn.Module):
    """Cross-entropy on the base plus lambda-weighted KL(base || student) per student.

    Args:
        temperature: T of the distillation softmax; the KL is scaled by T^2.
        label_smoothing: label smoothing of the cross-entropy terms, in [0, 1].
        student_ce_weight: weight of an extra CE term on each student (0 = the paper).
        detach_teacher: stop the KL gradient into the base (Slimmable in-place
            distillation) instead of the paper's two-way coupling.

    Call as ``loss_fn(output, target, lambda_)`` with an AdjoinedOutput whose base and
    students are logits of one shape (batch, classes). ``lambda_`` is a number in [0, 1]
    or a 0-d tensor (a CUDA graph's device copy), which is used as is: reading it would
    synchronise every step.
    """

    def __init__(self, temperature: float = 1.0, label_smoothing: float = 0.0,
                 student_ce_weight: float = 0.0, detach_teacher: bool = False) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_label_smoothing(label_smoothing)
        _check_range("student_ce_weight", student_ce_weight, 0.0)
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.student_ce_weight = student_ce_weight
        self.detach_teacher = detach_teacher

    def terms(self, output, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ce": base CE, "kl": summed student KL, "student_ce": summed student CE}."""
        for index, student in enumerate(output.students):
            _check_logits(f"students[{index}]", student, "base", output.base)
        base = _full_precision(output.base)
        ce = F.cross_entropy(base, target, label_smoothing=self.label_smoothing)
        teacher = base.detach() if self.detach_teacher else base
        t = self.temperature
        log_p_teacher = F.log_softmax(teacher / t, dim=-1)
        kl = base.new_zeros(())
        student_ce = base.new_zeros(())
        for student in output.students:
            student = _full_precision(student)
            kl = kl + t * t * F.kl_div(F.log_softmax(student / t, dim=-1), log_p_teacher,
                                       reduction="batchmean", log_target=True)
            if self.student_ce_weight:
                student_ce = student_ce + F.cross_entropy(student, target, label_smoothing=self.label_smoothing)
        return {"ce": ce, "kl": kl, "student_ce": student_ce}

    def forward(self, output, target: torch.Tensor, lambda_: Union[float, torch.Tensor]) -> torch.Tensor:
        if not isinstance(lambda_, torch.Tensor):
            _check_range("lambda_", lambda_, 0.0, 1.0, fix="; the schedules of anfast.loss give such values")
        terms = self.terms(output, target)
        return terms["ce"] + lambda_ * terms["kl"] + self.student_ce_weight * terms["student_ce"]

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, label_smoothing={self.label_smoothing}, "
                f"student_ce_weight={self.student_ce_weight}, detach_teacher={self.detach_teacher}")


class TaughtOutput(NamedTuple):
    """An AdjoinedOutput and a frozen teacher's logits for the same images (TrainConfig.teacher)."""

    output: object
    teacher: torch.Tensor


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                      temperature: float = 4.0, weight: float = 0.9,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al. 2015: ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + (1 - weight) * CE(target, student)``; T^2 keeps the soft term's gradient on the scale
    of the hard one as T changes (section 2 of that paper)."""
    _check_temperature(temperature)
    _check_range("weight", weight, 0.0, 1.0)
    _check_label_smoothing(label_smoothing)
    _check_logits("student", student, "teacher", teacher)
    student, teacher = _full_precision(student), _full_precision(teacher.detach())
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                  reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    return weight * t * t * kl + (1.0 - weight) * ce


class OneNetworkLoss(nn.Module):
    """Train one side of an adjoined network alone: the baselines of the paper's comparison.

    ``network="base"``: cross-entropy on the base only, the plain base (the students get no
    gradient). ``network="student"``: cross-entropy on each student only, the students
    trained alone; given a TaughtOutput, each student is distilled from the teacher
    (``distillation_loss``). The AN's lambda ramp does not apply: called as
    ``loss_fn(output, target, lambda_)`` like AdjoinedLoss, it ignores ``lambda_``.
    """

    def __init__(self, network: str, label_smoothing: float = 0.0, temperature: float = 4.0,
                 distill_weight: float = 0.9) -> None:
        super().__init__()
        if network not in ("base", "student"):
            raise ValueError(f"network={network!r}; choose base or student")
        _check_label_smoothing(label_smoothing)
        _check_temperature(temperature)
        _check_range("distill_weight", distill_weight, 0.0, 1.0)
        self.network = network
        self.label_smoothing = label_smoothing
        self.temperature = temperature
        self.distill_weight = distill_weight

    def forward(self, output, target: torch.Tensor, lambda_: Optional[float] = None) -> torch.Tensor:
        teacher = output.teacher if isinstance(output, TaughtOutput) else None
        output = output.output if isinstance(output, TaughtOutput) else output
        if self.network == "base":
            return F.cross_entropy(_full_precision(output.base), target, label_smoothing=self.label_smoothing)
        loss = 0.0
        for student in output.students:
            if teacher is None:
                loss = loss + F.cross_entropy(_full_precision(student), target,
                                              label_smoothing=self.label_smoothing)
            else:
                loss = loss + distillation_loss(student, teacher, target, temperature=self.temperature,
                                                weight=self.distill_weight,
                                                label_smoothing=self.label_smoothing)
        return loss

    def extra_repr(self) -> str:
        return (f"network={self.network}, label_smoothing={self.label_smoothing}, "
                f"temperature={self.temperature}, distill_weight={self.distill_weight}")
