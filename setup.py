"""Build script: the anfast package plus, where CUDA can be compiled, anfast._C.

The extension (csrc/ bindings + kernels/ device code) is built when nvcc is found
(CUDA_HOME, else nvcc on PATH), torch is a CUDA build, the pinned nvidia-cutlass
package (its CUTLASS / CuTe headers) is installed and ANFAST_BUILD_CUDA is not "0". Otherwise the install is pure Python and says why in one line; the package
imports either way and backend "cuda" then explains what is missing.

Environment:
    ANFAST_BUILD_CUDA=0        skip the extension
    ANFAST_CUDA_ARCHS="80;90"  compute capabilities to compile for (sm_80 or newer); with 90
                               in the list kernels/adjoined_conv_sm90a.cu (CUTLASS 3, TMA +
                               wgmma: forward, wgrad, stride-1 dgrad) is compiled too, for
                               sm_90a only (1 min 11 s on 2 cores)
    ANFAST_PREBUILT_KERNELS=D  link the kernels/ objects D/adjoined_conv_{fprop,dgrad,wgrad}.o
                               (compiled elsewhere by the same nvcc, for this GPU's arch;
                               with 90 in the archs, D/adjoined_conv_sm90a.o as well)
                               instead of compiling kernels/*.cu: the device code does not
                               include torch, so only the bindings are built here (a GPU
                               lease then spends seconds, not minutes, on the build); D's
                               SOURCES.sha256 must be this tree's (kernels/sources_digest.py)
    CUDA_HOME                  toolkit root; default: resolved from nvcc on PATH
    MAX_JOBS                   parallel compile jobs (default 2: CI has 2 cores)
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90"
SM90A_KERNELS = "kernels/adjoined_conv_sm90a.cu"


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else the toolkit behind `nvcc` on PATH.

    An nvcc on PATH may be a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`);
    torch's own guess then lands on the wrapper's directory, so the script is read
    for the real binary.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    if not _is_toolkit(Path(nvcc).parent.parent):
        with open(nvcc, "rb") as file:
            head = file.read(4096)
        if not head.startswith(b"#!"):
            return None
        targets = re.findall(rb"(/\S+/bin/nvcc)\b", head)
        nvcc = next((t.decode() for t in targets if os.path.isfile(t)), None)
        if nvcc is None:
            return None
    home = Path(nvcc).parent.parent
    return str(home) if _is_toolkit(home) else None


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def gencode_flags(archs: str) -> list[str]:
    """-gencode flags for "80;90": SASS per arch plus PTX of the newest, for future GPUs."""
    numbers = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not numbers or not all(re.fullmatch(r"\d+a?", a) for a in numbers):
        raise SystemExit(f"setup.py: ANFAST_CUDA_ARCHS={archs!r} is not a list like '80;90'")
    if any(int(a.rstrip("a")) < 80 for a in numbers):
        raise SystemExit(f"setup.py: ANFAST_CUDA_ARCHS={archs!r}: the kernels need sm_80 or newer")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in numbers]
    return flags + [f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}"]


def targets_hopper(archs: str) -> bool:
    """Whether the target archs include sm_90: then the sm_90a kernels are built too."""
    return "90" in [a.strip().rstrip("a") for a in archs.replace(",", ";").split(";")]


def compile_sm90a_kernels(nvcc: str, include_dirs: list[str], build_temp: str) -> str:
    """nvcc kernels/adjoined_conv_sm90a.cu for sm_90a alone; the object's path.

    torch's BuildExtension gives every .cu one set of -gencode flags, and wgmma / TMA
    im2col exist only on sm_90a, so this file is compiled on its own (again only when a
    kernels/ source is newer than the object).
    """
    source = ROOT / SM90A_KERNELS
    target = Path(build_temp) / "kernels" / (source.stem + ".o")
    newest = max(path.stat().st_mtime for path in (ROOT / "kernels").glob("*.[ch]*"))
    if target.is_file() and target.stat().st_mtime >= newest:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [nvcc, "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
               "-gencode=arch=compute_90a,code=sm_90a", *(f"-I{d}" for d in include_dirs),
               "-c", str(source), "-o", str(target)]
    print(" ".join(command), file=sys.stderr)
    subprocess.run(command, check=True)
    return str(target)


def cuda_extension_or_reason():
    """([CUDAExtension], cmdclass) to build anfast._C, or a one-line reason not to."""
    if os.environ.get("ANFAST_BUILD_CUDA", "1") == "0":
        return "ANFAST_BUILD_CUDA=0"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as error:
        return f"torch is not importable ({error}); install torch first, without build isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    find_cutlass = runpy.run_path(str(ROOT / "kernels" / "find_cutlass.py"))
    try:
        cutlass_include = find_cutlass["cutlass_include_dir"]()
        cutlass_util_include = find_cutlass["cutlass_util_include_dir"]()
    except ValueError as error:
        return str(error)
    os.environ.setdefault("MAX_JOBS", "2")
    archs = os.environ.get("ANFAST_CUDA_ARCHS", DEFAULT_ARCHS)
    hopper = targets_hopper(archs)
    kernels = ["kernels/adjoined_conv_fprop.cu", "kernels/adjoined_conv_dgrad.cu", "kernels/adjoined_conv_wgrad.cu"]
    sources, objects = ["csrc/adjoined_conv_api.cpp"], []
    prebuilt = os.environ.get("ANFAST_PREBUILT_KERNELS")
    if prebuilt:
        objects = [str(Path(prebuilt) / (Path(kernel).stem + ".o"))
                   for kernel in kernels + ([SM90A_KERNELS] if hopper else [])]
        missing = [o for o in objects if not os.path.isfile(o)]
        if missing:
            raise SystemExit(f"setup.py: ANFAST_PREBUILT_KERNELS={prebuilt}: missing {', '.join(missing)}")
        # Objects of other kernel sources would link and run kernels the bindings do not describe.
        stamp = Path(prebuilt) / "SOURCES.sha256"
        expected = runpy.run_path(str(ROOT / "kernels" / "sources_digest.py"))["sources_digest"](archs)
        found = stamp.read_text().strip() if stamp.is_file() else "none"
        if found != expected:
            raise SystemExit(f"setup.py: ANFAST_PREBUILT_KERNELS={prebuilt}: its objects were compiled from "
                             f"other kernel sources or archs than this tree's for {archs!r} ({stamp}: "
                             f"{found[:12]}, this tree: {expected[:12]}); rebuild them with "
                             f"benchmarks/prebuild_kernels.sh, or unset ANFAST_PREBUILT_KERNELS")
    else:
        sources += kernels
    extension = CUDAExtension(
        name="anfast._C",
        sources=sources,
        extra_objects=objects,
        include_dirs=[str(ROOT / "kernels"), cutlass_include],
        # The bindings offer the sm_90a variant only where its object is linked.
        define_macros=[("ANFAST_HAS_SM90A", "1")] if hopper else [],
        extra_compile_args={
            "cxx": ["-O3"],
            # CUTLASS's half / bfloat16 types need the conversions torch's flags switch off.
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_HALF2_OPERATORS__"]
            + gencode_flags(archs),
        },
    )
    if not hopper or prebuilt:
        return [extension], {"build_ext": BuildExtension}

    class BuildExtensionWithSm90a(BuildExtension):
        """BuildExtension that links the separately compiled sm_90a kernels in."""

        def build_extensions(self):
            nvcc = str(Path(cuda_home) / "bin" / "nvcc")
            include_dirs = [str(ROOT / "kernels"), cutlass_include, cutlass_util_include]
            extension.extra_objects.append(compile_sm90a_kernels(nvcc, include_dirs, self.build_temp))
            super().build_extensions()

    return [extension], {"build_ext": BuildExtensionWithSm90a}


result = cuda_extension_or_reason()
if isinstance(result, str):
    print(f"anfast: building without the CUDA extension anfast._C: {result}", file=sys.stderr)
    setup()
else:
    ext_modules, cmdclass = result
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
