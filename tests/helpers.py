"""Shared test helpers: dtype tolerances, a verbose relative-error check, stand-in
backends (some with kernel variants) and timers for the dispatch tests, and ResNet-50's
adjoined conv shapes, and the check that a GPU test left its CUDA context usable."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from anfast.ops import backend as registry, tuning
from anfast.ops.backend import TorchBackend
from anfast.ops.tuning import TOLERANCE  # noqa: F401  (DESIGN.md section 6, one definition)

# The coverage benchmarks' draw of the parameters a library starts at zero (timm's
# zero-initialised last BN of a residual block, GRN's weight and bias): one definition.
if str(Path(__file__).resolve().parents[1] / "benchmarks") not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from adjoin_coverage import draw_zero_parameters  # noqa: E402,F401


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block, as in a process run with OMP_NUM_THREADS=1: CPU
    convolutions sum in an order that depends on the thread count, and the tiny runs that
    compare losses bit for bit amplify the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session``: the pid of a child started with
    ``start_new_session=True``. ``os.killpg`` on that pid misses ninja's compilers, which
    ninja starts in process groups of their own: killed builds left a cc1plus or nvcc
    running beside the next tests for a minute or more."""
    for _ in range(10):  # a process may fork while the previous pass kills its parent
        members = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            except (OSError, IndexError):
                continue  # not a process, or one that has just exited
            if int(fields[3]) == session:
                members.append(int(entry))
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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


def hand_student_width(channels: int, alpha: float, step: int) -> int:
    """The tests' own statement of the width rule (not anfast.adjoin.student_width, which it
    checks): ceil(channels / alpha) rounded up to a multiple of ``step`` (round_to, or its lcm
    with a grouped conv's channels per group), at most ``channels``."""
    return min(channels, step * math.ceil(math.ceil(channels / alpha) / step))


def small_resnet(num_classes: int, stages: int = 2) -> torch.nn.Module:
    """torchvision's ResNet-18 cut to its stem and ``stages`` stages of one BasicBlock
    each (two: an identity and a downsampling shortcut): inductor compiles its training
    step on the CPU in about a third of ResNet-18's time (two stages) or a quarter (one),
    as measured in the launch census's test. Adjoin it with policy "all":
    under "paper" its student is the base itself (only layer2.0.conv2 qualifies, and its
    residual group holds the full-width shortcut), so the student gets no gradient."""
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                             num_classes=num_classes)
    for name in ("layer2", "layer3", "layer4")[stages - 1:]:
        setattr(model, name, torch.nn.Identity())
    model.fc = torch.nn.Linear(64 * 2 ** (stages - 1), num_classes)
    return model


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


class VariantStandIn(TorchBackend):
    """A fused-backend stand-in with kernel variants, as CudaBackend has: ``faults`` maps
    each variant name to how it is wrong (a StandInBackend ``wrong``; "" for right).
    Unbound (``variant=""``) it runs the variant the tuner decided for the problem, as
    the cuda backend does, and records in ``ran`` which one each forward call ran."""

    def __init__(self, name: str, faults: dict, variant: str = ""):
        self.name, self.faults, self.variant, self.ran = name, dict(faults), variant, []

    def variants(self, problem):
        return list(self.faults)

    def with_variant(self, variant):
        return VariantStandIn(self.name, self.faults, variant)

    def _running(self, problem) -> tuple[str, StandInBackend]:
        variant = self.variant or tuning.decided_variant(problem, self.name)
        return variant, StandInBackend(self.name, wrong=self.faults.get(variant, ""))

    def forward(self, problem):
        variant, runner = self._running(problem)
        self.ran.append(variant)
        return runner.forward(problem)

    def backward(self, grad_base, grad_student, problem, output_mask):
        return self._running(problem)[1].backward(grad_base, grad_student, problem, output_mask)


def install_backends(monkeypatch, *backends: TorchBackend) -> None:
    """Make ``backends`` auto's fused candidates (ahead of torch) for one test."""
    monkeypatch.setattr(registry, "BACKEND_PRIORITY", (*(b.name for b in backends), "torch"))
    for backend in backends:
        monkeypatch.setitem(registry._BACKEND_MODULES, backend.name, __name__)
        monkeypatch.setitem(registry._cache, backend.name, backend)


class FakeTimer:
    """An injected timer: fixed milliseconds per backend name; counts the timings."""

    def __init__(self, times_ms: dict):
        self.times_ms, self.calls = dict(times_ms), 0

    def __call__(self, run, *, backend, device):
        self.calls += 1
        run()
        return self.times_ms[backend]


def resnet50_conv_names() -> list[str]:
    """Names of ResNet-50's convolutions, without building its weights."""
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]


def resnet50_distinct_convs(batch: int = 8) -> list[str]:
    """The first name of each distinct conv shape of ResNet-50 (paper policy, alpha 4),
    in model order: the 53 convs are 23 problems, and the rest repeat one of them."""
    first: dict[tuple, str] = {}
    for name, shape in resnet50_shapes(batch).items():
        first.setdefault(tuple(sorted(shape.items())), name)
    return list(first.values())


@functools.lru_cache(maxsize=None)
def resnet50_shapes(batch: int = 8) -> dict[str, dict]:
    """Each conv of ResNet-50 adjoined with the paper policy (alpha 4), as a shape dict, in
    model order: benchmarks/conv.py's shapes (read from ``anfast.adjoin``'s network), so
    the GPU tests check the problems the benchmarks time.

    The stem's student shares the image (input_shared), so it is tested with an
    x_student of the image's 3 channels: the kernels still meet its C_in = 3.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import conv

    by_name = {name: shape for names, shape in conv.resnet50_conv_shapes(4.0) for name in names}
    return {name: dict(batch=batch, in_channels=s.c_in, out_channels=s.c_out, height=s.height,
                       width=s.width, kernel=s.kernel, stride=s.stride, padding=s.padding,
                       in_student=s.in_student, out_student=s.out_student)
            for name in resnet50_conv_names() for s in [by_name[name]]}


def shape_id(s: dict) -> str:
    return (f"N{s['batch']}-C{s['in_channels']}/{s['in_student']}-K{s['out_channels']}/{s['out_student']}"
            f"-{s['height']}x{s['width']}-k{s['kernel']}s{s['stride']}p{s['padding']}")


# Every way a tensor's values reach Python: on a GPU each one waits for the device. (On the
# CPU .cpu() returns the tensor itself and .numpy() shares its memory, so no torch op would
# show them: they are counted by name. __array__ goes through numpy, __format__ through item.)
HOST_READS = ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy")


class HostReads:
    """Counts every host read of a tensor (HOST_READS) during a run of anfast.train.loop,
    tagged with where the run was: "setup", ("in step", n) inside optimizer step n,
    ("after step", n) after it, and ``end`` from the call of ``owner.name`` on (what a
    run does once it has trained: not the loop's reads)."""

    def __init__(self, monkeypatch, owner, name: str, end: str):
        import anfast.train.loop as loop

        self.where, self.reads, self.steps, self.end = "setup", [], 0, end
        for read in HOST_READS:
            monkeypatch.setattr(torch.Tensor, read, self._counted(getattr(torch.Tensor, read)))
        step, finish = loop.train_step, getattr(owner, name)

        def watched_step(*args, **kwargs):
            self.where = ("in step", self.steps + 1)
            step(*args, **kwargs)
            self.steps += 1
            self.where = ("after step", self.steps)

        def watched_finish(*args, **kwargs):
            self.where = end
            return finish(*args, **kwargs)

        monkeypatch.setattr(loop, "train_step", watched_step)
        monkeypatch.setattr(owner, name, watched_finish)

    def _counted(self, original):
        def read(tensor, *args, **kwargs):
            self.reads.append(self.where)
            return original(tensor, *args, **kwargs)
        return read

    def per_step(self) -> dict:
        """{("in step" | "after step", n): reads}, the set-up's and the end's left out."""
        return {key: self.reads.count(key) for key in set(self.reads) if key not in ("setup", self.end)}


def stop_if_cuda_context_is_broken(nodeid: str, config=None) -> None:
    """After a test: if it used CUDA and the context no longer works (a kernel fault --
    an illegal address, a misaligned access -- is sticky: every later CUDA call in this
    process fails), stop this process rather than fail every later test in it.

    In a pytest-xdist worker (gpu_check.sh's correctness steps) the worker exits and
    xdist starts a fresh one for the tests left, its CUDA error printed to the real stderr
    (pytest's ``config``: its output capture is suspended first, else the exit would
    discard the line); in a plain run the session stops.
    """
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:  # torch.AcceleratorError is a RuntimeError
        message = (f"{nodeid} left this process's CUDA context unusable ({error}); "
                   f"stopping the process so that later tests run in a fresh one")
        if os.environ.get("PYTEST_XDIST_WORKER"):
            capture = config.pluginmanager.getplugin("capturemanager") if config is not None else None
            if capture is not None:
                capture.suspend_global_capture(in_=True)
            print(message, file=sys.stderr, flush=True)
            os._exit(1)
        pytest.exit(message, returncode=1)
