"""The CUDA C++ parts compile and load on a machine without a GPU (DESIGN.md section 6).

- anfast._C (built by `pip install -e .` where nvcc is found) imports here;
- backend "cuda" refuses CPU tensors and says why, and so do the C++ input checks;
- the CMake project (kernels as a library + C++ test + benchmark) builds for sm_80
  and sm_90, and its test reports "skipped" (exit 77) without a GPU.
Skipped only where nvcc is absent.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import anfast.ops
from anfast.ops.cuda_backend import BACKEND, load_extension

ROOT = Path(__file__).resolve().parent.parent
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on this machine: the CUDA parts cannot be built")


def small_cpu_problem():
    x_base = torch.randn(2, 6, 5, 7)
    return x_base, x_base[:, :3], torch.randn(4, 6, 3, 3)


@needs_nvcc
def test_extension_imports_without_gpu():
    extension, why = load_extension()
    assert extension is not None, (
        f"anfast._C did not import ({why}); build it with "
        "`pip install --no-deps --no-build-isolation -e .` (nvcc on PATH or CUDA_HOME set)"
    )
    assert {"forward", "dgrad", "wgrad"} <= set(dir(extension))


def test_cuda_backend_refuses_cpu_tensors_naming_the_device():
    x_base, x_student, weight = small_cpu_problem()
    with pytest.raises(anfast.ops.BackendUnavailable, match="tensors are on cpu; the cuda backend needs CUDA"):
        anfast.ops.adjoined_conv2d(x_base, x_student, weight, out_student=2, padding=1, backend="cuda")


def test_cuda_backend_lists_every_unsupported_feature():
    x_base, x_student, weight = small_cpu_problem()
    problem = anfast.ops.ConvProblem(x_base.double(), x_student.double(), weight.double(), None, 2,
                                     (1, 1), (1, 1), (2, 2), 1, torch.tensor([0, 2, 4]))
    reasons = " | ".join(BACKEND.unsupported_reasons(problem, explicit=True))
    for expected in ("tensors are on cpu", "dtype torch.float64", "dilation=(2, 2)", "student_in_index"):
        assert expected in reasons, f"missing {expected!r} in: {reasons}"


@needs_nvcc
def test_extension_checks_name_the_bad_argument():
    extension, why = load_extension()
    assert extension is not None, why
    x_base, x_student, weight = small_cpu_problem()
    with pytest.raises(RuntimeError, match="x_base must be a CUDA tensor, got one on cpu"):
        extension.forward(x_base, x_student, weight, None, 2, [1, 1], [1, 1])


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_library_test_and_benchmark(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80;90"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stdout[-4000:] + compile_.stderr[-4000:]
    for artifact in ("libanfast_kernels.a", "anfast_kernels_test", "anfast_kernels_bench"):
        assert (build / artifact).is_file(), f"{artifact} was not built"

    run = subprocess.run([str(build / "anfast_kernels_test")], capture_output=True, text=True)
    if torch.cuda.is_available():
        assert run.returncode == 0, run.stdout + run.stderr
    else:
        assert run.returncode == 77 and "SKIP" in run.stdout, (run.returncode, run.stdout, run.stderr)
