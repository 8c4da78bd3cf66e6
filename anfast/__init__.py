"""anfast: train compressed CNNs with Adjoined Networks, on fused kernels.

    an = anfast.adjoin(model, alpha=4, policy="paper")   # base + student, shared filters
    out = an(images)                                      # AdjoinedOutput(base, students)
    loss = anfast.AdjoinedLoss()(out, labels, lambda_)
    student = anfast.export_student(an, path="student/") # a plain, smaller model
"""

from importlib import metadata as _metadata

from anfast import models, ops
from anfast.adjoin import AdjoinedNetwork, AdjoinedOutput, AdjoinError, adjoin, student_width
from anfast.export import export_base, export_student, load_student, save_exported
from anfast.profile import count_parameters, profile
from anfast.streams import use_streams
from anfast.loss import AdjoinedLoss



def _version() -> str:
    """pyproject.toml's version: from the installed metadata, or read from the source tree
    while an editable install has not written its metadata yet (gpu_check's tests start
    beside its background build)."""
    try:
        return _metadata.version("anfast")
    except _metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as file:
            return tomllib.load(file)["project"]["version"]


__version__ = _version()

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
