"""Auto's measured backend choice (DESIGN.md section 4b), as cudnn.benchmark does it.

The first forward call of a problem key (device, dtype, shapes, stride, padding,
memory formats, which gradients are needed) VERIFIES every fused backend that
supports it against the torch backend in float64 (forward and every gradient,
within the dtype tolerance of DESIGN.md section 6, NaN never) and TIMES forward +
backward of each candidate and of torch. The fastest verified backend wins; torch
runs until a key is decided and wherever no fused backend is both correct and
faster. A backend that fails verification is never chosen for that key and is
reported once with its worst error. A backend with kernel variants (the cuda
backend's tile shapes) has each variant verified and timed as a candidate of its
own ("cuda:128x64x32"); the backend's result is its fastest verified variant, which
the decision names and the backend then runs for that key.

A key's ``Decision`` holds one ``Candidate`` per fused backend tried. Decisions
persist in ANFAST_CACHE_DIR (default ~/.cache/anfast), one JSON file per device,
software versions and build of anfast._C. No tuning happens when ANFAST_TUNE=0, while
a CUDA graph is being captured or while torch.compile traces (the custom op body is
opaque there anyway), nor lazily inside a distributed run: there ``tune_problems`` is
a collective (rank 0 measures, every rank installs rank 0's decisions), and the op
only reads those agreed decisions, so ranks can neither diverge nor wait on each other
inside a convolution.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from anfast._version import version
from anfast.ops import backend as registry
from anfast.ops.backend import Backend, ConvProblem, memory_format

__all__ = [
    "TOLERANCE",
    "relative_error",
    "grad_mask",
    "problem_key",
    "fp32_precision",
    "versions",
    "device_identity",
    "cache_dir",
    "cache_path",
    "tuning_off",
    "stream_is_capturing",
    "default_timer",
    "Candidate",
    "Decision",
    "backend_variants",
    "decided_variant",
    "Tuner",
    "get_tuner",
    "set_tuner",
    "fused_backend_names",
    "AUTO_OPT_IN",
    "auto_backend_name",
    "tune_problems",
    "describe_auto",
]

# DESIGN.md section 6: relative Frobenius error bounds per input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# 2: a backend's result names its fastest variant and holds every variant's result;
# a format-1 file (decisions timed only the default variant) is set aside and rewritten.
_CACHE_FORMAT = 2
_OUTPUT_NAMES = ("y_base", "y_student")
_GRAD_NAMES = ("dx_base", "dx_student", "dweight", "dbias")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius, float64); inf when actual has NaN."""
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    if torch.isnan(actual64).any():
        return float("inf")
    return float((actual64 - expected64).norm() / expected64.norm().clamp_min(1e-30))


def _format_name(x: torch.Tensor) -> str:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return "cl"
    return "c" if x.is_contiguous() else "s" + ",".join(map(str, x.stride()))


def grad_mask(problem: ConvProblem) -> tuple[bool, bool, bool, bool]:
    """Which of (x_base, x_student, weight, bias) get a gradient in this problem."""
    if problem.needs_grad is not None:
        return tuple(problem.needs_grad)
    bias_grad = problem.bias is not None and problem.bias.requires_grad
    return (problem.x_base.requires_grad, problem.x_student.requires_grad,
            problem.weight.requires_grad, bias_grad)


def problem_key(problem: ConvProblem) -> str:
    """The per-problem part of a decision's key (the device and versions name the file).

    A float32 key also holds how CUDA runs float32 convolutions and matmuls (TF32 or
    IEEE): cuDNN's TF32 convs (torch's default) time the torch backend, and a TF32 matmul
    takes the gemm backend out of the 1e-5 tolerance, so a decision made under one
    setting says nothing about the other."""
    def tensor(name, x):
        return f"{name}{'x'.join(map(str, x.shape))}:{_format_name(x)}"

    dtype = _DTYPE_NAMES.get(problem.x_base.dtype, str(problem.x_base.dtype))
    parts = [
        dtype, tensor("xb", problem.x_base), tensor("xs", problem.x_student),
        tensor("w", problem.weight), f"bias{int(problem.bias is not None)}",
        f"os{problem.out_student}", "stride{},{}".format(*problem.stride),
        "pad{},{}".format(*problem.padding), "dil{},{}".format(*problem.dilation),
        f"g{problem.groups}", f"index{int(problem.student_in_index is not None)}",
        "grad" + "".join(str(int(need)) for need in grad_mask(problem)),
    ]
    if problem.x_base.dtype == torch.float32:
        parts.append(f"conv:{fp32_precision('conv')} mm:{fp32_precision('matmul')}")
    return " ".join(parts)


def fp32_precision(op: str) -> str:
    """"tf32" or "ieee": how CUDA runs float32 ``op`` ("conv": cuDNN, "matmul": cuBLAS)
    in this process, set either by torch's legacy ``allow_tf32`` flags or (torch >= 2.9)
    by ``fp32_precision``; the op's own setting wins where both are given."""
    backends = torch.backends
    leaf, legacy = ((getattr(backends.cudnn, "conv", None), lambda: backends.cudnn.allow_tf32)
                    if op == "conv" else
                    (getattr(backends.cuda, "matmul", None), lambda: backends.cuda.matmul.allow_tf32))
    precision = getattr(leaf, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision
    return "tf32" if legacy() else "ieee"


@functools.lru_cache(maxsize=None)
def versions() -> Dict[str, str]:
    """The torch, triton and anfast versions a decision holds for, and the build of
    anfast._C: a decision names one of its kernel variants and was timed on its code."""
    from importlib import metadata

    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "anfast": version(),
            "kernels": extension_fingerprint()}


def extension_fingerprint() -> str:
    """The first 12 hex digits of the sha256 of the built anfast._C, "none" without one."""
    path = _extension_file()
    return "none" if path is None else hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _extension_file() -> Optional[Path]:
    """The file ``import anfast._C`` loads (found, not loaded), None where it is not built."""
    spec = importlib.util.find_spec("anfast._C")
    return None if spec is None or not spec.origin else Path(spec.origin)


@functools.lru_cache(maxsize=None)
def device_identity(device: torch.device) -> Dict[str, str]:
    """Name and capability of ``device``: what a decision was measured on."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": torch.cuda.get_device_name(device), "capability": f"sm_{major}{minor}"}
    return {"device": f"{device.type} {platform.machine()}", "capability": ""}


def _checked(entry: Any, what: str, types: Dict[str, tuple], optional: Sequence[str] = ()) -> None:
    """Raise ValueError naming what differs unless ``entry`` is a JSON object with the keys
    of ``types`` (those in ``optional`` all or none), each value of one of its types."""
    if not isinstance(entry, dict):
        raise ValueError(f"{what} is a {type(entry).__name__}, not a JSON object")
    expected = set(types) if set(optional) & entry.keys() else set(types) - set(optional)
    if entry.keys() != expected:
        together = f" ({' and '.join(optional)} together or neither)" if optional else ""
        raise ValueError(f"{what} has the keys {sorted(entry)}, expected {sorted(expected)}{together}")
    for key, value in entry.items():
        allowed = types[key]
        if not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{what}: {key!r} is {value!r}, expected {names}")


_NUMBER_OR_NULL = (int, float, type(None))


def _is_time(ms: Optional[float]) -> bool:
    """Whether ``ms`` is a measured time: finite and positive (the tune table divides by it)."""
    return ms is not None and math.isfinite(ms) and ms > 0


@dataclass(frozen=True)
class Candidate:
    """One fused backend's result on one problem (or one kernel variant's, inside
    ``variants``), as the decisions file stores it.

    Attributes:
        verified: forward and every needed gradient matched torch within TOLERANCE,
            output strides included.
        ms: median forward + backward milliseconds; None unless verified.
        why: why it was refused ("unsupported: ...", "raised ...", the worst error);
            "" when verified.
        error: worst relative error against the float64 reference; None when it did
            not run to a comparison.
        variant: for a backend with kernel variants, the fastest verified one ("" when
            none verified, or for a backend without variants).
        variants: {variant: Candidate} of every variant tried; None for a backend
            without variants (its file entry then has neither "variant" nor "variants").
    """

    verified: bool
    ms: Optional[float]
    why: str
    error: Optional[float]
    variant: str = ""
    variants: Optional[Dict[str, "Candidate"]] = None

    def to_json(self) -> Dict[str, Any]:
        """The entry of the decisions file (and of ``anfast tune --out``'s "candidates")."""
        entry = {"verified": self.verified, "error": self.error, "why": self.why, "ms": self.ms}
        if self.variants is not None:
            entry["variant"] = self.variant
            entry["variants"] = {name: result.to_json() for name, result in self.variants.items()}
        return entry

    @classmethod
    def from_json(cls, entry: Any, what: str = "candidate") -> "Candidate":
        """The Candidate of a file entry; ValueError, naming the entry as ``what``, when it
        is not one ``to_json`` writes: other keys or types, or values that contradict the
        attributes above (a verified result without a time or an error, a time on an
        unverified one, a variant that is not a verified one of ``variants``), which
        ``explain``, the tune table and the cuda backend's variant choice rely on."""
        _checked(entry, what, {"verified": (bool,), "error": _NUMBER_OR_NULL, "why": (str,),
                               "ms": _NUMBER_OR_NULL, "variant": (str,), "variants": (dict,)},
                 optional=("variant", "variants"))
        variants = entry.get("variants")
        if variants is not None:
            variants = {name: cls.from_json(result, f"{what}, variant {name!r}")
                        for name, result in variants.items()}
        result = cls(verified=entry["verified"], ms=entry["ms"], why=entry["why"], error=entry["error"],
                     variant=entry.get("variant", ""), variants=variants)
        contradiction = result._contradiction()
        if contradiction:
            raise ValueError(f"{what}: {contradiction}")
        return result

    def _contradiction(self) -> str:
        """Why this result is not one the tuner makes ("" when it is)."""
        if self.verified and not _is_time(self.ms):
            return f"'verified' is true but 'ms' is {self.ms!r}, expected its time (a positive number)"
        if not self.verified and self.ms is not None:
            return (f"'verified' is false but 'ms' is {self.ms!r}, expected null (only a verified "
                    "result is timed)")
        if self.verified and (self.error is None or not math.isfinite(self.error)):
            return f"'verified' is true but 'error' is {self.error!r}, expected its finite relative error"
        if self.variants is None:
            return ""
        nested = [name for name, result in self.variants.items() if result.variants is not None]
        if nested:
            return f"variant {nested[0]!r} has variants of its own"
        verified = sorted(name for name, result in self.variants.items() if result.verified)
        if self.verified and self.variant not in verified:
            return f"'variant' is {self.variant!r}, expected one of its verified variants {verified}"
        if not self.verified and self.variant:
            return f"'variant' is {self.variant!r} though 'verified' is false, expected ''"
        return ""


@dataclass(frozen=True)
class Decision:
    """Auto's choice for one problem key, as the decisions file stores it.

    Attributes:
        backend: what runs the key: "torch" or the fastest verified fused backend.
        variant: the kernel variant ``backend`` runs ("" for torch or a backend
            without variants).
        reason: why, in one line ("verified (variant 64x64), 1.60x torch's speed").
        torch_ms: torch's median forward + backward milliseconds.
        candidates: {fused backend name: Candidate} of every backend tried.
    """

    backend: str
    variant: str
    reason: str
    torch_ms: float
    candidates: Dict[str, Candidate]

    def to_json(self) -> Dict[str, Any]:
        """The entry of the decisions file under the key's problem_key."""
        return {"backend": self.backend, "variant": self.variant, "reason": self.reason,
                "torch_ms": self.torch_ms,
                "candidates": {name: result.to_json() for name, result in self.candidates.items()}}

    @classmethod
    def from_json(cls, entry: Any, what: str = "decision") -> "Decision":
        """The Decision of a file entry; ValueError, naming the entry as ``what``, when it
        is not one ``to_json`` writes: other keys or types, a candidate Candidate.from_json
        refuses, or values that contradict the attributes above (a backend or candidate
        this anfast does not have, a fused backend that was not verified, another variant
        than its candidate's), so auto never runs a backend the file merely names."""
        _checked(entry, what, {"backend": (str,), "variant": (str,), "reason": (str,),
                               "torch_ms": (int, float), "candidates": (dict,)})
        decision = cls(backend=entry["backend"], variant=entry["variant"], reason=entry["reason"],
                       torch_ms=entry["torch_ms"],
                       candidates={name: Candidate.from_json(result, f"{what}, candidate {name!r}")
                                   for name, result in entry["candidates"].items()})
        contradiction = decision._contradiction()
        if contradiction:
            raise ValueError(f"{what}: {contradiction}")
        return decision

    def _contradiction(self) -> str:
        """Why this decision is not one the tuner makes with this anfast's backends ("" when
        it is)."""
        if not _is_time(self.torch_ms):
            return f"'torch_ms' is {self.torch_ms!r}, expected torch's time (a positive number)"
        if self.backend not in registry.BACKEND_PRIORITY:
            return (f"'backend' is {self.backend!r}, not a backend of this anfast "
                    f"({', '.join(registry.BACKEND_PRIORITY)})")
        fused = [name for name in registry.BACKEND_PRIORITY if name != "torch"]
        unknown = [name for name in self.candidates if name not in fused]
        if unknown:
            return f"candidate {unknown[0]!r} is not a fused backend of this anfast ({', '.join(fused)})"
        if self.backend == "torch":
            return f"'variant' is {self.variant!r} for torch, expected ''" if self.variant else ""
        chosen = self.candidates.get(self.backend)
        if chosen is None or not chosen.verified:
            return (f"'backend' is {self.backend!r}, which has no verified candidate (auto runs "
                    "only verified ones)")
        if self.variant != chosen.variant:
            return f"'variant' is {self.variant!r}, its candidate's is {chosen.variant!r}"
        return ""


def cache_dir() -> Path:
    """$ANFAST_CACHE_DIR, else ~/.cache/anfast."""
    return Path(os.environ.get("ANFAST_CACHE_DIR") or Path.home() / ".cache" / "anfast")


def cache_path(device: torch.device) -> Path:
    """The decisions file of ``device`` with this torch / triton / anfast."""
    identity = device_identity(device)
    name = "-".join([identity["device"], identity["capability"],
                     *(f"{k}{v}" for k, v in versions().items())])
    return cache_dir() / ("tune-" + re.sub(r"[^A-Za-z0-9.+]+", "_", name).strip("_") + ".json")


def _expected_header(device: torch.device) -> Dict[str, Any]:
    return {"format": _CACHE_FORMAT, **device_identity(device), "versions": versions()}


def _read_cache(path: Path, header: Dict[str, Any]) -> Dict[str, Decision]:
    """Decisions in ``path``; a missing file is empty, a corrupt or foreign one (or one
    with an entry Decision.from_json refuses: malformed, or naming a backend, time or
    variant auto cannot use) is ignored with a one-line warning (never a crash, never a
    wrong backend: the cache only saves time)."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return _ignore_cache(path, f"unreadable ({error})")
    found = {key: content.get(key) for key in header} if isinstance(content, dict) else None
    if found != header or not isinstance(content.get("decisions"), dict):
        return _ignore_cache(path, f"written for {found}, this process is {header}")
    try:
        return {key: Decision.from_json(entry, f"the decision for [{key}]")
                for key, entry in content["decisions"].items()}
    except ValueError as error:
        return _ignore_cache(path, f"invalid ({error})")


def _ignore_cache(path: Path, why: str) -> Dict[str, Decision]:
    warnings.warn(f"anfast: ignoring tuning cache {path}: {why}; it will be rewritten", stacklevel=3)
    return {}


def _write_cache(path: Path, header: Dict[str, Any], decisions: Dict[str, Decision]) -> None:
    """Merge ``decisions`` into the file and replace it atomically (temp + os.replace),
    so a concurrent reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already reported when this process first read it
        merged = {**_read_cache(path, header), **decisions}
    handle, temp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            entries = {key: decision.to_json() for key, decision in merged.items()}
            json.dump({**header, "decisions": entries}, file, indent=1, sort_keys=True)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def tuning_off() -> bool:
    """Whether ANFAST_TUNE=0 turns tuning inside a run off (the op's first calls and
    ``anfast train``'s warm-up tune); ``anfast tune`` and ``tune_problems`` still measure."""
    return os.environ.get("ANFAST_TUNE", "1") == "0"


def stream_is_capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cuda_median_ms(run: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``run`` on the GPU: each repeat between two CUDA events, the
    repeats queued back to back and waited for once. The host runs ahead, as it does in
    training, so a repeat's time is the device's (the host's launch work counts only
    where it is slower than the kernels it launches); a synchronize after every repeat
    would leave the GPU idle while the host queues the next one and add that host time
    to every candidate."""
    for _ in range(warmup):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def default_timer(run: Callable[[], None], *, backend: str, device: torch.device) -> float:
    """Median milliseconds of ``run``: CUDA events after warm-up on a GPU. Elsewhere one
    perf_counter run: auto never uses a CPU measurement (auto on the CPU is torch), and
    the Triton interpreter takes seconds to minutes per call."""
    if device.type == "cuda":
        return _cuda_median_ms(run, warmup=5, repeats=20)
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


Timer = Callable[..., float]


@dataclass
class _Reference:
    """The torch backend's outputs and gradients in float64, and the gradients fed to both."""

    outputs: tuple
    grads_out: tuple
    grads: tuple


def _reference(problem: ConvProblem, mask) -> _Reference:
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    problem64 = ConvProblem(as64(problem.x_base), as64(problem.x_student), as64(problem.weight),
                            as64(problem.bias), problem.out_student, problem.stride,
                            problem.padding, problem.dilation, problem.groups,
                            problem.student_in_index)
    torch_backend = registry.get_backend("torch")
    outputs = torch_backend.forward(problem64)
    generator = torch.Generator(problem.x_base.device).manual_seed(0)
    # In the layout the op hands the backward pass (its input's), not the float64
    # reference's: torch's float64 conv on CUDA returns NCHW for channels_last inputs,
    # and a candidate timed on those would time a layout copy too.
    grads_out = tuple(
        torch.empty_like(y, dtype=problem.x_base.dtype, memory_format=memory_format(x)).normal_(generator=generator)
        for y, x in zip(outputs, (problem.x_base, problem.x_student)))
    grads = torch_backend.backward(*(g.double() for g in grads_out), problem64, mask) \
        if any(mask) else (None,) * 4
    return _Reference(outputs, grads_out, grads)


def _verify(outputs: tuple, grads: tuple, mask, reference: _Reference, dtype: torch.dtype,
            torch_outputs: tuple) -> Candidate:
    """The candidate's verification: verified, worst relative error, why when not verified
    (its ms is left None for the caller that timed it).

    Values are compared with the float64 reference; output strides with ``torch_outputs``,
    the torch backend's outputs in the problem's own dtype: that is what a run without
    the fused backend would hand on. (Not the float64 reference's: torch's float64
    convolution on CUDA returned NCHW strides for channels_last inputs on an H200 with
    torch 2.11, 2026-11-26, and comparing with those refused every fused backend.)"""
    tolerance = TOLERANCE[dtype]
    checks = list(zip(_OUTPUT_NAMES, outputs, reference.outputs))
    checks += [(name, got, want) for name, got, want, need in
               zip(_GRAD_NAMES, grads, reference.grads, mask) if need]
    worst_name, worst = "", 0.0
    for name, got, want in checks:
        if got is None or got.shape != want.shape:
            shape = None if got is None else tuple(got.shape)
            return Candidate(verified=False, ms=None, error=None,
                             why=f"{name} has shape {shape}, torch gives {tuple(want.shape)}")
        error = relative_error(got, want)
        if error >= worst:
            worst_name, worst = name, error
    for name, got, want in zip(_OUTPUT_NAMES, outputs, torch_outputs):
        if got.stride() != want.stride():
            return Candidate(verified=False, ms=None, error=worst,
                             why=f"{name} has strides {got.stride()}, torch gives {want.stride()}")
    if worst > tolerance:
        what = "NaN or inf" if worst == float("inf") else f"relative error {worst:.2e}"
        return Candidate(verified=False, ms=None, error=worst,
                         why=f"{worst_name} {what} > tolerance {tolerance:.0e}")
    return Candidate(verified=True, ms=None, error=worst, why="")


def backend_variants(backend: Backend, problem: ConvProblem) -> List[tuple[str, Backend]]:
    """(variant name, backend object running it) per kernel variant ``backend`` offers
    for ``problem`` (Backend.variants / with_variant); a backend without variants is one
    candidate, ``[("", backend)]``."""
    names = backend.variants(problem)
    if not names:
        return [("", backend)]
    return [(name, backend.with_variant(name)) for name in names]


def decided_variant(problem: ConvProblem, backend_name: str) -> str:
    """The variant of ``backend_name`` found fastest on ``problem`` ("" when the problem is
    not decided or that backend's variants were not verified): what the backend runs for
    it, whether auto chose it or it was named."""
    decision = get_tuner().lookup(problem)
    result = decision.candidates.get(backend_name) if decision is not None else None
    return result.variant if result is not None else ""


def _fastest_variant(tried: Dict[str, Candidate]) -> Candidate:
    """A backend's result from its variants' ({variant: result}; {"": result} for a
    backend without variants): the fastest verified variant's result naming it, with
    every variant's result as its ``variants``."""
    if list(tried) == [""]:
        return tried[""]
    verified = [name for name, result in tried.items() if result.verified]
    if verified:
        best = min(verified, key=lambda name: tried[name].ms)
        return replace(tried[best], variant=best, variants=tried)
    why = "no variant verified: " + "; ".join(f"{name}: {result.why}" for name, result in tried.items())
    return Candidate(verified=False, ms=None, why=why, error=None, variant="", variants=tried)


class Tuner:
    """Holds decisions (per device file, per problem key), measures new ones.

    Args:
        timer: ``timer(run, backend=name, device=device) -> ms``; tests inject one.
        lazy_devices: device types on which auto tunes on a first call. CUDA only by
            default (auto on the CPU is torch); tests add "cpu" to exercise the CUDA
            path on CPU tensors, the one seam this module has for that.
    """

    def __init__(self, timer: Timer = default_timer, lazy_devices: Iterable[str] = ("cuda",)):
        self.timer = timer
        self.lazy_devices = frozenset(lazy_devices)
        self._tables: Dict[tuple, Dict[str, Decision]] = {}
        self._agreed: Dict[str, Decision] = {}

    def table(self, device: torch.device) -> Dict[str, Decision]:
        """This process's decisions for ``device`` (read from its cache file once; keyed
        without building the file name, since auto looks this up on every call)."""
        where = (device, os.environ.get("ANFAST_CACHE_DIR"))
        if where not in self._tables:
            self._tables[where] = _read_cache(cache_path(device), _expected_header(device))
        return self._tables[where]

    def lookup(self, problem: ConvProblem) -> Optional[Decision]:
        """The decision auto uses for ``problem``, or None (not decided: torch runs)."""
        if _distributed():
            return self._agreed.get(problem_key(problem))
        return self.table(problem.x_base.device).get(problem_key(problem))

    def may_tune(self, problem: ConvProblem) -> str:
        """'' when auto may tune ``problem`` now, else why not."""
        device = problem.x_base.device
        if tuning_off():
            return "ANFAST_TUNE=0 turns on-the-fly tuning off"
        if stream_is_capturing(device):
            return "a CUDA graph is being captured"
        if torch.compiler.is_compiling():
            return "torch.compile is tracing"
        if _distributed():
            return ("a distributed run takes only the decisions all ranks agreed on "
                    "(anfast.ops.tuning.tune_problems)")
        return ""

    def decide(self, problem: ConvProblem, candidates: Sequence[str], explicit: bool = False,
               ) -> Decision:
        """Verify and time ``candidates`` (fused backend names) against torch on
        ``problem``'s own tensors; store and persist the decision and return it."""
        device = problem.x_base.device
        mask = grad_mask(problem)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            reference = _reference(problem, mask)
            torch_ms, torch_outputs, _ = self._time(registry.get_backend("torch"), "torch", problem, mask,
                                                    reference)
            times = {"torch": torch_ms}
            results = {}
            for name in candidates:
                reasons = registry.backend_reasons(name, problem, explicit)
                if reasons:
                    results[name] = Candidate(verified=False, ms=None, error=None,
                                              why="unsupported: " + "; ".join(reasons))
                    continue
                tried = {variant: self._try(f"{name}:{variant}" if variant else name, runner, problem, mask,
                                            reference, torch_outputs)
                         for variant, runner in backend_variants(registry.get_backend(name), problem)}
                results[name] = _fastest_variant(tried)
                if results[name].verified:
                    times[name] = results[name].ms
        fastest = min(times, key=times.get)
        variant = results[fastest].variant if fastest in results else ""
        if fastest == "torch":
            reason = ("no verified fused backend is faster than torch" if len(times) > 1
                      else "no fused backend could run it and pass verification" if results
                      else "no fused backend to try")
        else:
            reason = (f"verified{f' (variant {variant})' if variant else ''}, "
                      f"{times['torch'] / times[fastest]:.2f}x torch's speed")
        decision = Decision(backend=fastest, variant=variant, reason=reason, torch_ms=times["torch"],
                            candidates=results)
        self.table(device)[problem_key(problem)] = decision
        _write_cache(cache_path(device), _expected_header(device),
                     {problem_key(problem): decision})
        return decision

    def _try(self, label: str, backend: Backend, problem: ConvProblem, mask, reference: _Reference,
             torch_outputs: tuple) -> Candidate:
        """Time and verify one candidate (a backend, or one variant of it, named ``label``):
        its result with ``ms`` (None unless verified); a failure is reported once."""
        try:
            ms, outputs, grads = self._time(backend, label, problem, mask, reference)
        except Exception as error:  # a kernel that cannot run this problem
            result = Candidate(verified=False, ms=None, error=None,
                               why=f"raised {type(error).__name__}: {str(error).splitlines()[0]}")
        else:
            result = _verify(outputs, grads, mask, reference, problem.x_base.dtype, torch_outputs)
            if result.verified:
                return replace(result, ms=ms)
        warnings.warn(f"anfast: backend {label!r} failed verification on [{problem_key(problem)}]: "
                      f"{result.why}; auto will not use it for this problem", stacklevel=3)
        return result

    def _time(self, backend: Backend, label: str, problem: ConvProblem, mask, reference: _Reference):
        """(median ms, outputs, gradients) of forward + backward, timed as ``label``; the
        outputs of the last timed run are the ones verified, so a kernel is checked as it
        ran when timed (after autotuning's first calls, say)."""
        last = {}

        def run():
            last["outputs"] = backend.forward(problem)
            last["grads"] = (backend.backward(*reference.grads_out, problem, mask)
                             if any(mask) else (None,) * 4)
        ms = float(self.timer(run, backend=label, device=problem.x_base.device))
        return ms, last["outputs"], last["grads"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# Fused backends auto does not try unless ANFAST_AUTO_BACKENDS names them. Triton: on an
# H200 (2026-11-26, benchmarks/results/tune-resnet50-triton-conv2-*.json) it was 7.2x
# slower than cuDNN on ResNet-50's 3x3 convs and never chosen, while trying it compiles
# 3 configs of 3 kernels per new conv, minutes of a first training step on a fresh cache.
# gemm is tried by default: it compiles nothing (cuBLAS), takes only channels_last 1x1
# convs (refusing the rest costs a few checks), and verifying and timing it are the 25
# forward + backward runs every candidate gets, milliseconds for a 1x1 conv.
AUTO_OPT_IN = ("triton",)


def fused_backend_names() -> List[str]:
    """The backends auto tries instead of torch, in priority order: $ANFAST_AUTO_BACKENDS
    (comma-separated, e.g. "gemm,cuda,triton") when set, else every fused backend but those of
    AUTO_OPT_IN. ``anfast tune --backends`` measures any of them explicitly."""
    fused = [name for name in registry.BACKEND_PRIORITY if name != "torch"]
    chosen = os.environ.get("ANFAST_AUTO_BACKENDS")
    if chosen is None:
        return [name for name in fused if name not in AUTO_OPT_IN]
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in fused]
    if unknown:
        raise ValueError(f"ANFAST_AUTO_BACKENDS={chosen!r}: {', '.join(unknown)} is not a fused backend; "
                         f"choose among {','.join(fused)} (torch always runs when none is faster)")
    return [name for name in fused if name in names]


_tuner = Tuner()


def get_tuner() -> Tuner:
    """The process-wide tuner that auto dispatch uses."""
    return _tuner


def set_tuner(tuner: Tuner) -> Tuner:
    """Replace the process-wide tuner (tests inject timers); returns the previous one."""
    global _tuner
    previous, _tuner = _tuner, tuner
    return previous


def auto_backend_name(problem: ConvProblem, phase: str, may_tune: bool = True) -> str:
    """Auto's backend for ``problem``: torch on devices auto does not tune (the CPU),
    else the key's decision, tuning it first on a forward call where that is allowed
    (``may_tune`` False: while dispatch records a pass, which must measure nothing)."""
    tuner = get_tuner()
    if problem.x_base.device.type not in tuner.lazy_devices:
        return "torch"
    decision = tuner.lookup(problem)
    if decision is None and phase == "forward" and may_tune and not tuner.may_tune(problem):
        decision = tuner.decide(problem, fused_backend_names())
    return decision.backend if decision else "torch"


def tune_problems(problems: Sequence[ConvProblem], candidates: Optional[Sequence[str]] = None,
                  explicit: bool = False, force: bool = False, progress: Optional[bool] = None,
                  on_decided: Optional[Callable[[int, Decision, bool], None]] = None,
                  ) -> List[tuple[Decision, bool]]:
    """Decide every problem; returns (decision, was_cached) per problem.

    Keys already decided (in memory or the cache file) are not measured again unless
    ``force``, or unless the cached decision did not try one of ``candidates``. In a
    distributed run this is a collective that every rank must call: rank 0 measures,
    then broadcasts its decisions, which every rank installs for auto. ``progress``: a
    tqdm bar of the problems on stderr (None: where stderr is a terminal; a first tune
    of a ResNet-50 on a GPU takes from seconds to minutes, Triton's compiles included).
    ``on_decided(index, decision, was_cached)`` is called as each problem is decided (on
    rank 0 only in a distributed run), so a caller can keep what a cut-short tune did.
    """
    tuner = get_tuner()
    candidates = list(fused_backend_names() if candidates is None else candidates)
    if not _distributed():
        return [(decision, was_cached) for _, decision, was_cached in
                _decide_all(tuner, problems, candidates, explicit, force, progress, on_decided)]
    # Rank 0 sends its decisions, or its error: the other ranks must never wait for a
    # broadcast that will not come.
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _decide_all(tuner, problems, candidates, explicit, force, progress, on_decided)
        except Exception as error:
            box[0] = f"{type(error).__name__}: {error}"
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise RuntimeError(f"anfast: rank 0 failed to tune the conv backends: {box[0]}")
    tuner._agreed.update({key: decision for key, decision, _ in box[0]})
    return [(decision, was_cached) for _, decision, was_cached in box[0]]


def _decide_all(tuner: Tuner, problems, candidates, explicit, force, progress, on_decided):
    """(key, decision, was_cached) per problem; a key repeated in ``problems`` is measured once."""
    results = []
    bar = tqdm(problems, desc="anfast: tuning the convs", unit="conv", leave=False,
               disable=None if progress is None else not progress)
    for problem in bar:
        key = problem_key(problem)
        bar.set_postfix_str(key[:60], refresh=False)
        cached = tuner.table(problem.x_base.device).get(key)
        measured_now = any(key == k and not was_cached for k, _, was_cached in results)
        if cached is not None and (measured_now or not force and
                                   set(candidates) <= set(cached.candidates)):
            results.append((key, cached, not measured_now))
        else:
            results.append((key, tuner.decide(problem, candidates, explicit), False))
        if on_decided is not None:
            on_decided(len(results) - 1, results[-1][1], results[-1][2])
    return results


def describe_auto(problem: ConvProblem) -> str:
    """What auto decided for ``problem`` and why, in one line."""
    tuner = get_tuner()
    device = problem.x_base.device
    if device.type not in tuner.lazy_devices:
        return f"torch (auto runs torch on {device.type}; tuning is for CUDA devices)"
    decision = tuner.lookup(problem)
    if decision is None:
        blocked = tuner.may_tune(problem)
        return ("torch: not tuned yet; " + (f"cannot tune now: {blocked}" if blocked else
                "the first forward call will verify and time the fused backends"))
    parts = [f"{decision.backend}: {decision.reason} (torch {decision.torch_ms:.3g} ms"]
    for name, result in decision.candidates.items():
        variant = f":{result.variant}" if result.variant else ""
        parts.append(f"{name}{variant} {result.ms:.3g} ms" if result.verified
                     else f"{name} not verified: {result.why}")
    where = "agreed by rank 0" if _distributed() else f"cached in {cache_path(device)}"
    return "; ".join(parts) + f"); {where}"
