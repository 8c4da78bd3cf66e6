"""The CUDA C++ parts compile and load on a machine without a GPU (DESIGN.md section 6).

- anfast._C (built by `pip install -e .` where nvcc is found) imports here;
- backend "cuda" refuses CPU tensors and says why, and so do the C++ input checks;
- the CMake project (kernels as a library + C++ test + benchmark) builds for sm_80, its
  test reports "skipped" (exit 77) without a GPU, and for sm_90 it adds the sm_90a
  kernels (read from its compile commands; pip install compiled them already).
Skipped only where nvcc is absent.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import anfast.ops
from anfast.ops.cuda_backend import BACKEND, SM90A_VARIANT, load_extension

from helpers import kill_session

ROOT = Path(__file__).resolve().parent.parent
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on this machine: the CUDA parts cannot be built")


def test_cutlass_pin_is_one_version_everywhere():
    """pyproject's build requirements and the README's install line (which .ci/run reads
    and runs) pin the version kernels/find_cutlass.py checks, and its headers are the
    ones found."""
    import runpy
    import tomllib

    finder = runpy.run_path(str(ROOT / "kernels" / "find_cutlass.py"))
    pin = f"nvidia-cutlass=={finder['CUTLASS_VERSION']}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert pin in requires, requires
    assert pin in (ROOT / "README.md").read_text(), f"README.md does not install {pin}"
    assert "README.md" in (ROOT / ".ci/run").read_text(), ".ci/run no longer runs the README's command"
    include = Path(finder["cutlass_include_dir"]())
    assert (include / "cutlass" / "conv" / "kernel" / "default_conv2d_fprop.h").is_file()
    assert (include / "cute" / "tensor.hpp").is_file()


def small_cpu_problem():
    x_base = torch.randn(2, 6, 5, 7)
    return x_base, x_base[:, :3], torch.randn(4, 6, 3, 3)


@needs_nvcc
def test_kernel_sources_digest_follows_every_device_source_and_the_archs(tmp_path):
    """The digest prebuilt kernel objects carry (kernels/sources_digest.py) changes with any
    byte of a kernels/ source and with the archs, and is the same for one arch list however
    it is written."""
    for path in (ROOT / "kernels").iterdir():
        if path.suffix in (".cu", ".cuh", ".h", ".py"):
            shutil.copy(path, tmp_path / path.name)
    import runpy

    here = runpy.run_path(str(ROOT / "kernels" / "sources_digest.py"))["sources_digest"]
    copy = runpy.run_path(str(tmp_path / "sources_digest.py"))["sources_digest"]
    assert copy("90") == here("90") == here(" 90;") != here("80;90") == here("90,80")
    tile_table = tmp_path / "cutlass_conv.cuh"
    tile_table.write_bytes(tile_table.read_bytes().replace(b"128", b"256", 1))
    assert copy("90") != here("90")
    shutil.copy(ROOT / "kernels" / "cutlass_conv.cuh", tile_table)
    pin = tmp_path / "find_cutlass.py"  # the CUTLASS headers the objects were compiled against
    pin.write_text(pin.read_text().replace('CUTLASS_VERSION = "', 'CUTLASS_VERSION = "9', 1))
    assert copy("90") != here("90")


@pytest.mark.skipif(not HAS_NVCC, reason="setup.py builds the extension only where nvcc is found")
def test_prebuilt_kernel_objects_are_linked_only_with_this_trees_sources_stamp(tmp_path):
    """setup.py links ANFAST_PREBUILT_KERNELS's objects only when their SOURCES.sha256 is this
    tree's: objects of another commit's kernels would link, and run tiles the bindings do
    not describe. gpu_check.sh's install then builds the kernels itself."""
    import runpy

    objects = tmp_path / "kernels"
    objects.mkdir()
    for stem in ("adjoined_conv_fprop", "adjoined_conv_dgrad", "adjoined_conv_wgrad", "adjoined_conv_sm90a"):
        (objects / f"{stem}.o").write_bytes(b"")
    digest = runpy.run_path(str(ROOT / "kernels" / "sources_digest.py"))["sources_digest"]
    for stamp, named in ((None, "none"), ("0" * 64, "000000000000"), (digest("80;90"), digest("80;90")[:12])):
        if stamp is not None:
            (objects / "SOURCES.sha256").write_text(stamp + "\n")
        build = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
             "--build-lib", str(tmp_path / "lib")], cwd=ROOT, capture_output=True, text=True, timeout=240,
            env={**os.environ, "ANFAST_PREBUILT_KERNELS": str(objects), "ANFAST_CUDA_ARCHS": "90"})
        assert build.returncode != 0
        assert (f"its objects were compiled from other kernel sources or archs than this tree's for '90' "
                f"({objects / 'SOURCES.sha256'}: {named}, this tree: {digest('90')[:12]})") in build.stderr, build.stderr
        assert not (tmp_path / "temp").exists()  # refused before anything compiled

    # The stamp prebuild_kernels.sh writes, for the archs gpu_check.sh installs with: accepted,
    # the build goes on to compile the bindings (stopped there: they take a minute).
    stamp = subprocess.run([sys.executable, "kernels/sources_digest.py", "90"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    (objects / "SOURCES.sha256").write_text(stamp)
    build = subprocess.Popen(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
         "--build-lib", str(tmp_path / "lib")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
        env={**os.environ, "ANFAST_PREBUILT_KERNELS": str(objects), "ANFAST_CUDA_ARCHS": "90"})
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "temp").exists() and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        started = (tmp_path / "temp").exists()
    finally:
        kill_session(build.pid)  # ninja's compilers too, in process groups of their own
        output = build.communicate()[0]
    assert started and "compiled from other kernel sources" not in output, output[-3000:]


def test_bindings_never_ask_at_zeros_for_a_memory_format():
    # at::zeros drops the memory format of its TensorOptions: the binding's zero-padded
    # "channels_last" copies came back NCHW and failed its own layout check in wgrad on
    # an H200 (2026-11-26). Allocate with at::empty(..., memory_format) and zero_().
    source = (ROOT / "csrc" / "adjoined_conv_api.cpp").read_text()
    calls = re.findall(r"at::zeros\((?:[^()]|\([^()]*\))*\)", source)
    assert calls, "the bindings pad with zeros somewhere; this test must see those calls"
    assert not [call for call in calls if "memory_format" in call], calls
    assert source.count(").zero_()") >= 2  # the padded activations and the padded weight


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
                                     (5, 1), (1, 1), (2, 2), 1, torch.tensor([0, 2, 4]))
    reasons = " | ".join(BACKEND.unsupported_reasons(problem, explicit=True))
    for expected in ("tensors are on cpu", "dtype torch.float64", "dilation=(2, 2)", "student_in_index",
                     "stride=(5, 1)"):
        assert expected in reasons, f"missing {expected!r} in: {reasons}"


def test_cuda_backend_refuses_activations_past_32_bit_offsets():
    # expand() gives a 7.7 GB float32 tensor without memory.
    x_base = torch.zeros(1, 1, 1, 1).expand(600, 64, 224, 224)
    problem = anfast.ops.ConvProblem(x_base, x_base[:, :16], torch.zeros(64, 64, 1, 1), None, 16,
                                     (1, 1), (0, 0), (1, 1), 1, None)
    reasons = " | ".join(BACKEND.unsupported_reasons(problem, explicit=True))
    assert "7.2 GiB" in reasons and "split the batch" in reasons, reasons


@needs_nvcc
def test_extension_checks_name_the_bad_argument():
    extension, why = load_extension()
    assert extension is not None, why
    x_base, x_student, weight = small_cpu_problem()
    with pytest.raises(RuntimeError, match="x_base must be a CUDA tensor, got one on cpu"):
        extension.forward(x_base, x_student, weight, None, 2, [1, 1], [1, 1])


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _cmake_configure(build: Path, archs: str) -> None:
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
         "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr


# Tests whose slow part conftest.py's background_work starts with the session.
BACKGROUND_TESTS = ("test_cmake_builds_library_test_and_benchmark",)


def start_in_background(folder: Path):
    """(process, build folder) of the sm_80 CMake configure + build, started now at low
    priority with its output in build.log; None where nvcc or cmake is missing."""
    if not HAS_NVCC or shutil.which("cmake") is None:
        return None
    build = folder / "build"
    build.mkdir(parents=True)
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80",
                 "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-DPython3_EXECUTABLE={sys.executable}"]
    compile_ = ["cmake", "--build", str(build), "-j2"]
    script = f"import subprocess\nsubprocess.run({configure!r}, check=True)\nsubprocess.run({compile_!r}, check=True)"
    with open(build / "build.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: os.nice(10))
    return process, build


@needs_nvcc
@needs_cmake
def test_cmake_builds_library_test_and_benchmark(background_work, tmp_path):
    """The integrators' build: library, test and benchmark link, the test runs. For sm_80:
    the installed extension already compiled the same sources for sm_80, sm_90 and
    sm_90a (pip install), so this build checks CMake's own wiring, and its sm_90a branch
    is checked without compiling (next test). An sm_90 build here took 160 s of the
    suite on the 2-core machine (the CUTLASS 3 file alone 116 s), sm_80 alone 50 to 80 s:
    it starts with the session (conftest.background_work) and runs beside the tests
    before this one, which waits for what is left of it."""
    started = background_work.get(__name__) or start_in_background(tmp_path)
    process, build = started
    process.wait(timeout=900)
    assert process.returncode == 0, (build / "build.log").read_text()[-8000:]
    for artifact in ("libanfast_kernels.a", "anfast_kernels_test", "anfast_kernels_bench"):
        assert (build / artifact).is_file(), f"{artifact} was not built"

    run = subprocess.run([str(build / "anfast_kernels_test")], capture_output=True, text=True)
    if torch.cuda.is_available():
        assert run.returncode == 0, run.stdout + run.stderr
    else:
        assert run.returncode == 77 and "SKIP" in run.stdout, (run.returncode, run.stdout, run.stderr)


def _with_options_files(entry: dict) -> str:
    """A compile_commands.json entry's command with its response files (nvcc's
    ``--options-file F``, CMake's includes) read into it."""
    def expand(match):
        return (Path(entry["directory"]) / match.group(1)).read_text()
    return re.sub(r"(?:--options-file |@)(\S+)", expand, entry["command"])


@needs_nvcc
@needs_cmake
def test_cmake_builds_the_sm90a_kernels_for_sm_90_and_only_then(tmp_path):
    """CMakeLists.txt's sm_90a branch, read from the compile commands it generates: with
    90 among the archs, kernels/adjoined_conv_sm90a.cu compiles for sm_90a alone (with
    CUTLASS's util headers) into the library, whose users get ANFAST_HAS_SM90A; without
    90 it is not built at all."""
    def commands(archs):
        build = tmp_path / archs
        _cmake_configure(build, archs)
        entries = json.loads((build / "compile_commands.json").read_text())
        return {Path(entry["file"]).name: _with_options_files(entry) for entry in entries}

    hopper = commands("90")
    sm90a = hopper["adjoined_conv_sm90a.cu"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in sm90a and "arch=compute_90," not in sm90a, sm90a
    assert re.search(r"-I\S*tools/util/include", sm90a), sm90a
    assert "-DANFAST_HAS_SM90A" in hopper["adjoined_conv_test.cpp"], hopper["adjoined_conv_test.cpp"]
    assert "sm_90" in hopper["adjoined_conv_fprop.cu"] and "sm_90a" not in hopper["adjoined_conv_fprop.cu"]
    ampere = commands("80")
    assert "adjoined_conv_sm90a.cu" not in ampere, sorted(ampere)
    assert "ANFAST_HAS_SM90A" not in ampere["adjoined_conv_test.cpp"]


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one the triton wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.is_file() else None


def _sass_functions(library: Path, cuobjdump: str) -> list[dict]:
    """Per (arch, kernel): name, registers / stack / local bytes, SASS instruction lines."""
    usage = subprocess.run([cuobjdump, "-res-usage", str(library)], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", str(library)], capture_output=True, text=True, check=True).stdout
    resources, arch, name = {}, None, None
    for line in usage.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line):
            resources[(arch, name)] = tuple(int(g) for g in m.groups())
    functions, arch = [], None
    for line in sass.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.search(r"Function : (\S+)", line):
            functions.append(dict(arch=arch, name=m.group(1), code=[]))
        elif functions and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            functions[-1]["code"].append(line)
    for f in functions:
        f["regs"], f["stack"], f["local"] = resources[(f["arch"], f["name"])]
    return functions


def _main_loop(code: list[str]) -> list[str]:
    """The instructions of the loop holding the MMA / FMA work: the longest backward branch."""
    def address(line):
        return int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16)
    best = []
    for i, line in enumerate(code):
        m = re.search(r"BRA\s+(?:`\(\S+\)\s+)?(0x[0-9a-f]+)", line)
        if m and int(m.group(1), 16) < address(line):
            start = next(j for j, other in enumerate(code) if address(other) >= int(m.group(1), 16))
            if any(re.search(r"HMMA|FFMA", other) for other in code[start:i]) and i - start > len(best):
                best = code[start:i + 1]
    return best


def _kernel_identity(entry: dict) -> tuple:
    """(dtype, op, threadblock tile) of one entry of anfast._C.kernel_resources()."""
    return entry["dtype"], entry["op"], tuple(entry["threadblock"])


def _symbol_identity(symbol: str) -> tuple:
    """(dtype, op, threadblock tile) of a conv kernel from its mangled name; the first
    CUTLASS GemmShape in it is the mainloop's threadblock shape."""
    dtype = "bfloat16" if "bfloat16_t" in symbol else "float16" if "half_t" in symbol else "float32"
    op = ("wgrad" if "wgrad_kernel" in symbol else "dgrad_strided" if "StridedDgrad" in symbol
          else "dgrad" if "Dgrad" in symbol else "forward")
    tile = re.search(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E", symbol)
    return dtype, op, tuple(int(g) for g in tile.groups())


@needs_nvcc
def test_extension_sass_pipelined_tensor_cores_no_spills():
    """The built anfast._C for sm_80 and sm_90: every kernel of every tile variant is
    compiled for both; no spills; every forward / dgrad / wgrad kernel loads with cp.async (LDGSTS); 16-bit ones read fragments with ldmatrix (LDSM)
    into mma.sync (HMMA), fp32 ones run FFMA; no integer division (I2F / MUFU.RCP) in
    a dgrad main loop."""
    extension, why = load_extension()
    assert extension is not None, why
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel) to read the SASS")
    functions = _sass_functions(Path(extension.__file__), cuobjdump)
    convs = [f for f in functions if "fused_conv_kernel" in f["name"] or "wgrad_kernel" in f["name"]]
    assert {f["arch"] for f in convs} == {"sm_80", "sm_90"}
    # Every tile variant's kernels, per arch: forward, dgrad stride 1, dgrad strided, wgrad
    # of each dtype and tile shape (variants sharing a wgrad tile share its kernel).
    expected = {_kernel_identity(entry) for entry in extension.kernel_resources() if entry["tiles"] != SM90A_VARIANT}
    for arch in ("sm_80", "sm_90"):
        compiled = sorted(_symbol_identity(f["name"]) for f in convs if f["arch"] == arch)
        assert compiled == sorted(expected), (arch, compiled)
    for f in functions:
        assert f["stack"] == 0 and f["local"] == 0, f"{f['arch']} {f['name'][:100]} spills"
    for f in convs:
        what = f"{f['arch']} {f['name'][:100]}"
        text = "\n".join(f["code"])
        assert "LDGSTS" in text, f"{what}: no cp.async"
        if "half_t" in f["name"] or "bfloat16_t" in f["name"]:
            assert "LDSM" in text and "HMMA" in text, f"{what}: no ldmatrix / mma.sync"
        else:
            assert "FFMA" in text and "HMMA" not in text, f"{what}: fp32 must stay off the tensor cores"
        if "Dgrad" in f["name"]:
            loop = "\n".join(_main_loop(f["code"]))
            assert loop and not re.search(r"I2F|MUFU\.RCP", loop), f"{what}: integer division in the main loop"


@needs_nvcc
def test_sm90a_kernels_use_tma_and_wgmma_without_spills():
    """The CUTLASS 3 kernels (kernels/adjoined_conv_sm90a.cu), where the extension holds
    them: forward, dgrad and wgrad per 16-bit dtype, compiled for sm_90a alone, one per
    dtype and op that kernel_resources() lists (with their threads and shared memory);
    each loads through TMA (UTMALDG) into wgmma (HGMMA), with no spills."""
    extension, why = load_extension()
    assert extension is not None, why
    entries = [e for e in extension.kernel_resources() if e["tiles"] == SM90A_VARIANT]
    if not entries:
        pytest.skip("anfast._C was built without the sm_90a kernels (no 90 in ANFAST_CUDA_ARCHS)")
    assert sorted((e["dtype"], e["op"]) for e in entries) == sorted(
        (dtype, op) for dtype in ("bfloat16", "float16") for op in ("dgrad", "forward", "wgrad"))
    assert all(e["threads"] > 0 and e["shared_bytes"] > 0 and min(e["threadblock"]) > 0 for e in entries), entries
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel) to read the SASS")
    hopper = [f for f in _sass_functions(Path(extension.__file__), cuobjdump) if "ConvUniversal" in f["name"]]
    assert {f["arch"] for f in hopper} == {"sm_90a"}
    operators = {"forward": "0", "dgrad": "1", "wgrad": "2"}  # cutlass::conv::Operator
    compiled = sorted(
        ("bfloat16" if "bfloat16_t" in f["name"] else "float16",
         re.search(r"ConvProblemShapeILNS\d+_8OperatorE(\d)", f["name"]).group(1)) for f in hopper)
    assert compiled == sorted((e["dtype"], operators[e["op"]]) for e in entries)
    for f in hopper:
        text = "\n".join(f["code"])
        what = f"{f['arch']} {f['name'][:100]}"
        assert "HGMMA" in text and "UTMALDG" in text, f"{what}: no wgmma / TMA load"
        assert f["stack"] == 0 and f["local"] == 0, f"{what} spills"


def test_sm90a_variant_is_offered_only_where_it_can_run():
    """The backend says which phases the sm_90a kernels leave to the 2.x tiles (a bias:
    the forward; a stride: dgrad; padding past TMA im2col's corners: all three) and why
    the variant cannot run a problem (CPU tensors; every phase left to the 2.x tiles),
    and leaves it out of the tuner's variants then."""
    from anfast.ops.cuda_backend import CudaBackend, sm90a_fallback_reasons, sm90a_variant_reasons

    x = torch.randn(2, 16, 9, 9, dtype=torch.bfloat16)
    weight = torch.randn(16, 16, 3, 3, dtype=torch.bfloat16)

    def problem(bias, stride, padding):
        return anfast.ops.ConvProblem(x, x[:, :8], weight, bias, 8, stride, padding, (1, 1), 1, None)

    plain = problem(None, (1, 1), (1, 1))
    assert sm90a_fallback_reasons(plain) == {}
    biased_strided = problem(torch.zeros(16, dtype=torch.bfloat16), (2, 2), (1, 1))
    fallbacks = sm90a_fallback_reasons(biased_strided)
    assert sorted(fallbacks) == ["dgrad", "forward"]
    assert "bias" in fallbacks["forward"] and "stride=(2, 2)" in fallbacks["dgrad"]
    assert [r.split(" (")[0] for r in sm90a_variant_reasons(biased_strided)] == [
        f"{SM90A_VARIANT} runs on sm_90 GPUs only"]
    padded = problem(None, (1, 1), (200, 200))
    assert sorted(sm90a_fallback_reasons(padded)) == ["dgrad", "forward", "wgrad"]
    reasons = sm90a_variant_reasons(padded)
    assert [r.split(":")[0] for r in reasons] == [f"{SM90A_VARIANT} runs on sm_90 GPUs only (tensors on cpu)"] + [
        f"{SM90A_VARIANT} leaves its {phase} to the 2.x tiles" for phase in ("forward", "dgrad", "wgrad")]
    assert all("padding=(200, 200)" in r for r in reasons[1:])
    for refused in (plain, padded):
        assert SM90A_VARIANT not in CudaBackend().variants(refused)
        assert set(sm90a_variant_reasons(refused)) <= set(
            CudaBackend(SM90A_VARIANT).unsupported_reasons(refused, explicit=True))
