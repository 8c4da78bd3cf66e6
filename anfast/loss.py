"""The Adjoined Networks objective and its lambda schedules (DESIGN.md section 2).

    L = CE(y, z_b) + lambda * sum_s T^2 * KL(softmax(z_b / T) || softmax(z_s / T))

Defaults are the authors': T = 1, no student CE term, and no stop-gradient, so the
KL term also trains the base ("regularizes the teacher").
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdjoinedLoss", "OneNetworkLoss", "TaughtOutput", "distillation_loss", "paper_lambda", "linear_lambda", "constant_lambda", "get_lambda_schedule"]


def paper_lambda(progress: float) -> float:
    """The authors' ramp min(4 (e / E)^2, 1); ``progress`` is e / E (per epoch or per step)."""
    return min(4.0 * progress**2, 1.0)


def linear_lambda(progress: float) -> float:
    """A linear ramp reaching 1 halfway through training."""
    return min(2.0 * progress, 1.0)


def constant_lambda(progress: float) -> float:
    """lambda = 1 throughout."""
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


class AdjoinedLoss(nn.Module):
    """Cross-entropy on the base plus lambda-weighted KL(base || student) per student.

    Args:
        temperature: T of the distillation softmax; the KL is scaled by T^2.
        label_smoothing: label smoothing of the cross-entropy terms.
        student_ce_weight: weight of an extra CE term on each student (0 = the paper).
        detach_teacher: stop the KL gradient into the base (Slimmable in-place
            distillation) instead of the paper's two-way coupling.

    Call as ``loss_fn(output, target, lambda_)`` with an AdjoinedOutput.
    """

    def __init__(self, temperature: float = 1.0, label_smoothing: float = 0.0,
                 student_ce_weight: float = 0.0, detach_teacher: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.student_ce_weight = student_ce_weight
        self.detach_teacher = detach_teacher

    def terms(self, output, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ce": base CE, "kl": summed student KL, "student_ce": summed student CE}."""
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

    def forward(self, output, target: torch.Tensor, lambda_: float) -> torch.Tensor:
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
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        if not 0 <= distill_weight <= 1:
            raise ValueError(f"distill_weight={distill_weight}: must be in [0, 1]")
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
