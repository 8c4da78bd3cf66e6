"""The adjoined convolution op: reference, backend dispatch and the custom op."""

from anfast.ops.conv import adjoined_conv2d
from anfast.ops.backend import BACKEND_PRIORITY, Backend, BackendUnavailable, ConvProblem, get_backend
from anfast.ops.dispatch import choose_backend, explain
from anfast.ops import tuning  # auto's measured choice: anfast.ops.tuning.tune_problems, ...
from anfast.ops.reference import adjoined_conv2d_reference

__all__ = [
    "adjoined_conv2d",
    "adjoined_conv2d_reference",
    "BACKEND_PRIORITY",
    "Backend",
    "BackendUnavailable",
    "ConvProblem",
    "choose_backend",
    "explain",
    "get_backend",
    "tuning",
]
