"""Backend choice for the adjoined convolution: choose, explain, record.

Choice: an explicit ``backend=`` argument, else the ANFAST_BACKEND environment
variable, else auto. A backend that was asked for by name and cannot run raises with
its reasons (anfast.ops.backend). Auto runs torch on the CPU; on a GPU it runs the
fastest backend that was verified against torch and timed on that problem
(anfast.ops.tuning), torch until then. Recorders see every choice made.
"""

from __future__ import annotations

import contextlib
import os
from typing import List

from anfast.ops import backend as registry, tuning
from anfast.ops.backend import Backend, BackendUnavailable, ConvProblem, backend_reasons, get_backend

__all__ = ["choose_backend", "decided_backend", "explain", "recording", "note_choice"]


# Recorders see every choice the op makes: `anfast tune` collects a model's problems
# with one, `anfast train` reports the backend of each layer. While one is active auto
# does not tune, so recording a pass measures nothing.
_recorders: List[List[tuple[ConvProblem, str, str]]] = []


@contextlib.contextmanager
def recording():
    """Collect (problem, phase, backend name) of every adjoined conv call in the block."""
    records: List[tuple[ConvProblem, str, str]] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def note_choice(problem: ConvProblem, phase: str, backend: str) -> None:
    """Called for every adjoined conv call; a no-op unless a recorder is active."""
    for records in _recorders:
        records.append((problem, phase, backend))


def choose_backend(problem: ConvProblem, requested: str = "", phase: str = "forward") -> Backend:
    """The backend that runs ``problem``: requested > $ANFAST_BACKEND > auto.

    ``phase`` is "forward" or "backward": only a forward call may tune a new problem
    (it holds the real bias), the backward call of the same problem reads its decision.
    """
    requested = requested or os.environ.get("ANFAST_BACKEND", "")
    if requested and requested != "auto":
        reasons = backend_reasons(requested, problem, explicit=True)
        if reasons:
            raise BackendUnavailable(
                f"adjoined_conv2d: backend {requested!r} cannot run this problem: " + "; ".join(reasons)
            )
        backend = get_backend(requested)
    else:
        backend = get_backend(tuning.auto_backend_name(problem, phase, may_tune=not _recorders))
    note_choice(problem, phase, backend.name)
    return backend


def decided_backend(problem: ConvProblem, name: str, decided: bool, phase: str) -> Backend:
    """The backend a custom-op pass runs. ``decided``: ``name`` was chosen by choose_backend
    before the forward op (eager mode), and both passes run it, the backward pass repeating
    no choice. Else ``name`` is the request as the call gave it (torch.compile traced the
    call: nothing was chosen then), and the choice is choose_backend's, now, in ``phase``."""
    if not decided:
        return choose_backend(problem, name, phase=phase)
    if phase == "backward":  # the forward's pass was recorded when its choice was made
        note_choice(problem, phase, name)
    return get_backend(name)


def explain(problem: ConvProblem) -> str:
    """One line per backend ('ok' or why it cannot run ``problem`` in auto mode), then
    what auto decided for it and why."""
    lines = []
    for name in registry.BACKEND_PRIORITY:
        reasons = backend_reasons(name, problem, explicit=False)
        lines.append(f"  {name}: " + ("ok" if not reasons else "; ".join(reasons)))
    lines.append("  auto: " + tuning.describe_auto(problem))
    return "\n".join(lines)
