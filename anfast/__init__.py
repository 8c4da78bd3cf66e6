"""anfast: train compressed CNNs with Adjoined Networks, on fused kernels.

    an = anfast.adjoin(model, alpha=4, policy="paper")   # base + student, shared filters
    out = an(images)                                      # AdjoinedOutput(base, students)
    loss = anfast.AdjoinedLoss()(out, labels, lambda_)
    student = anfast.export_student(an, path="student/") # a plain, smaller model
"""

from anfast import models, ops
from anfast._version import version as _package_version
from anfast.adjoin import AdjoinedNetwork, AdjoinedOutput, AdjoinError, adjoin, student_width
from anfast.export import export_base, export_student, load_student, save_exported
from anfast.profile import count_parameters, profile
from anfast.streams import use_streams
from anfast.loss import AdjoinedLoss

__version__ = _package_version()  # pyproject.toml's

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
