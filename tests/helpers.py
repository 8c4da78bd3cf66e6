"""Shared test helpers: dtype tolerances and a verbose relative-error check."""

from __future__ import annotations

import torch

# DESIGN.md section 6: relative Frobenius error bounds per input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


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
