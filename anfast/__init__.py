"""anfast: train compressed CNNs with Adjoined Networks, on fused kernels.

    an = anfast.adjoin(model, alpha=4, policy="paper")   # base + student, shared filters
    out = an(images)                                      # AdjoinedOutput(base, students)
    loss = anfast.AdjoinedLoss()(out, labels, lambda_)
    student = anfast.export_student(an, path="student/") # a plain, smaller model
"""

import importlib

from anfast import models, ops
from anfast._version import version as _package_version
from anfast.adjoin import AdjoinedNetwork, AdjoinedOutput, AdjoinError, adjoin, student_width
from anfast.export import export_base, export_student, load_student, save_exported
from anfast.profile import count_parameters, profile
from anfast.streams import use_streams
from anfast.loss import AdjoinedLoss

__version__ = _package_version()  # pyproject.toml's

# Subpackages that ``import anfast`` leaves unloaded (the data stack, the trainer, DAN):
# ``anfast.data.create_loader(...)`` imports anfast.data on first use, as torchvision's
# ``torchvision.datasets`` is there after ``import torchvision``.
_LAZY_SUBPACKAGES = ("cli", "dan", "data", "nn", "runs", "train", "triton")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))

__all__ = [
    "ops",
    "models",
    "adjoin",
    "AdjoinedNetwork",
    "AdjoinedOutput",
    "AdjoinError",
    "student_width",
    "export_student",
    "export_base",
    "save_exported",
    "load_student",
    "profile",
    "count_parameters",
    "AdjoinedLoss",
    "use_streams",
]
