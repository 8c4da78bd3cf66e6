"""Shared test helpers: dtype tolerances, a verbose relative-error check, and stand-in
backends and timers for the dispatch tests."""

from __future__ import annotations

import torch

from anfast.ops import dispatch
from anfast.ops.dispatch import TorchBackend
from anfast.ops.tuning import TOLERANCE  # noqa: F401  (DESIGN.md section 6, one definition)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str = "") -> None:
    """Relative Frobenius error <= tolerance, no NaN; on failure show the worst elements."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    nans = int(torch.isnan(actual64).sum())
    diff = (actual64 - expected64).abs()
    error = float(diff.norm() / expected64.norm().clamp_min(1e-30))
    if nans or error > tolerance:
        worst = diff.flatten().topk(min(5, diff.numel()))
        where = [tuple(torch.unravel_index(i, diff.shape)) for i in worst.indices]
        raise AssertionError(
            f"{name}: relative error {error:.3e} > {tolerance:.1e}, {nans} NaN; worst at "
            + ", ".join(f"{tuple(int(j) for j in w)}: {float(actual64[w]):.6g} vs {float(expected64[w]):.6g}"
                        for w in where)
        )


class StandInBackend(TorchBackend):
    """A fused-backend stand-in for dispatch tests: the torch backend, optionally made
    wrong in one output ("y_student", "dweight", or "nan" for a NaN y_base), counting
    its forward calls."""

    def __init__(self, name: str, wrong: str = ""):
        self.name, self.wrong, self.forward_calls = name, wrong, 0

    def forward(self, problem):
        self.forward_calls += 1
        y_base, y_student = super().forward(problem)
        if self.wrong == "y_student":
            y_student = y_student * 1.5
        if self.wrong == "nan":
            y_base = y_base.clone()
            y_base.view(-1)[0] = float("nan")
        return y_base, y_student

    def backward(self, grad_base, grad_student, problem, output_mask):
        dx_base, dx_student, dweight, dbias = super().backward(grad_base, grad_student, problem,
                                                               output_mask)
        if self.wrong == "dweight":
            dweight = dweight + 0.1 * dweight.norm() / dweight.numel() ** 0.5
        return dx_base, dx_student, dweight, dbias


def install_backends(monkeypatch, *backends: StandInBackend) -> None:
    """Make ``backends`` auto's fused candidates (ahead of torch) for one test."""
    monkeypatch.setattr(dispatch, "BACKEND_PRIORITY", (*(b.name for b in backends), "torch"))
    for backend in backends:
        monkeypatch.setitem(dispatch._BACKEND_MODULES, backend.name, __name__)
        monkeypatch.setitem(dispatch._cache, backend.name, backend)


class FakeTimer:
    """An injected timer: fixed milliseconds per backend name; counts the timings."""

    def __init__(self, times_ms: dict):
        self.times_ms, self.calls = dict(times_ms), 0

    def __call__(self, run, *, backend, device):
        self.calls += 1
        run()
        return self.times_ms[backend]
