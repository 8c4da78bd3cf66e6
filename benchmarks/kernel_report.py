"""Static report of the compiled conv kernels for sm_90 and sm_80, without a GPU.

    python benchmarks/kernel_report.py            # every shipped config, both archs
    python benchmarks/kernel_report.py --subset   # one config per kernel (the CPU test)

Triton: every shipped config of every kernel is compiled through the specialization a
real launch gets. The public launchers run on meta-device tensors (ResNet-50 layer
shapes, batch 256, bf16, channels_last) with the autotuner replaced by a recorder, so
the recorded arguments are exactly what a launch passes; they then go through
triton's own binder (16-byte pointer alignment, integers divisible by 16, integers
equal to 1 and the stride-1 channel axis specialised to constexpr 1) into
triton.compile for GPUTarget("cuda", arch, 32).

CUDA C++: the compiled extension anfast/_C*.so, when present, is read per kernel symbol
and arch with the cuobjdump the triton wheel ships; each symbol's (dtype, op,
threadblock tile) names the tile variants that run it, and anfast._C.kernel_resources()
gives its threads and dynamic shared memory, so every variant gets its CTAs per SM.
With sm_90 in the archs the sm_90a cubin is read too: the CUTLASS 3 kernels (forward,
stride-1 dgrad and wgrad per 16-bit dtype, kernels/adjoined_conv_sm90a.cu), named by
their variant and identified by the conv::Operator in their ConvProblemShape.

Per kernel and config: registers, spill bytes (ptxas' spill stores; for the
extension the local + stack bytes, an upper bound), static shared memory (Triton's
dynamic shared memory for its kernels), CTAs per SM from registers, shared memory
and threads against the arch limits (and which of them limits), and SASS counts:
HGMMA, HMMA, LDGSTS (cp.async), UTMALDG (TMA loads), LDSM, BAR, SYNCS (mbarriers),
plus the integer-division sequences (I2F / MUFU.RCP / F2I) inside the innermost loop
that issues MMAs (the main loop). JSON to results/kernel_report-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import io
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions: the report compiles them
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from common import RESULTS, environment  # noqa: E402

ARCHS = (90, 80)
# anfast._C's variant name of its CUTLASS 3 kernels (anfast.ops.cuda_backend.SM90A_VARIANT).
SM90A_VARIANT = "sm90a-tma-wgmma"
# Per-SM limits (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"): registers, shared memory per SM and per block, threads, resident
# blocks; the driver reserves 1 KiB of shared memory per block on sm_80+.
ARCH_LIMITS = {
    90: dict(registers=65536, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, threads=2048, ctas=32),
    80: dict(registers=65536, smem_per_sm=164 * 1024, smem_per_block=163 * 1024, threads=2048, ctas=32),
}
SMEM_RESERVED_PER_CTA = 1024
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
SASS_COUNTS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDSM", "BAR", "SYNCS")
DIVISION = ("I2F", "MUFU.RCP", "F2I")
TOOLS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One ResNet-50 conv (batch 256, the paper's alpha-4 student widths)."""

    name: str
    c_in: int
    c_out: int
    side: int
    k: int
    stride: int
    in_student: int
    out_student: int


# The three specialisations ResNet-50's convs fall into: 3x3 stride 1, 3x3 stride 2,
# 1x1 (stride 1). The 7x7 stem (3 input channels) is not on the fused path's hot list.
LAYERS = (
    Layer("layer2.1.conv2", 128, 128, 28, 3, 1, 32, 32),
    Layer("layer3.0.conv2", 256, 256, 28, 3, 2, 64, 64),
    Layer("layer2.1.conv1", 512, 128, 28, 1, 1, 128, 32),
)
BATCH = 256


# --------------------------------------------------------------------------- SASS


def run_tool(tool: str, *args: str) -> str:
    return subprocess.run([str(TOOLS / tool), *args], capture_output=True, text=True, check=True).stdout


def parse_res_usage(text: str) -> dict[str, dict]:
    """cuobjdump -res-usage: {function: {REG, STACK, SHARED, LOCAL}} (one arch's listing)."""
    usage, name = {}, None
    for line in text.splitlines():
        found = re.match(r"\s*Function (\S+):", line)
        if found:
            name = found.group(1)
        elif name and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return usage


def split_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass: {function: [(address, instruction)]}."""
    functions, current = {}, None
    for line in text.splitlines():
        found = re.match(r"\s*Function : (\S+)", line)
        if found:
            current = functions.setdefault(found.group(1), [])
            continue
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if found and current is not None:
            current.append((int(found.group(1), 16), found.group(2).strip()))
    return functions


def opcode(instruction: str) -> str:
    """The opcode with its modifiers, predicate guard removed (``@!P0 BRA`` -> ``BRA``)."""
    parts = instruction.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def sass_summary(instructions: list[tuple[int, str]]) -> dict:
    """Instruction counts, and the division ops in the innermost loop that issues MMAs."""
    ops = [opcode(text) for _, text in instructions]
    counts = {name: sum(op.split(".")[0] == name for op in ops) for name in SASS_COUNTS}
    counts["instructions"] = len(ops)
    # Loops are backward branches; the main loop is the shortest one holding an MMA.
    loops = []
    for address, text in instructions:
        found = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if found and opcode(text).startswith("BRA") and int(found.group(1), 16) <= address:
            loops.append((int(found.group(1), 16), address))
    mma_loops = [(start, end) for start, end in loops
                 if any(start <= a <= end and opcode(t).split(".")[0] in ("HGMMA", "HMMA") for a, t in instructions)]
    main = min(mma_loops, key=lambda span: span[1] - span[0], default=None)
    summary = {"sass": counts, "main_loop_instructions": None, "main_loop_division_ops": None}
    if main is not None:
        body = [opcode(t) for a, t in instructions if main[0] <= a <= main[1]]
        summary["main_loop_instructions"] = len(body)
        summary["main_loop_division_ops"] = sum(any(op.startswith(d) for d in DIVISION) for op in body)
    return summary


def occupancy(arch: int, registers: int, smem: int, threads: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them."""
    limits = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    by = {
        "registers": (limits["registers"] // regs_per_warp) // warps,
        "shared memory": (limits["smem_per_sm"] // (smem + SMEM_RESERVED_PER_CTA)
                          if smem <= limits["smem_per_block"] else 0),
        "threads": limits["threads"] // threads,
        "blocks": limits["ctas"],
    }
    limiter = min(by, key=by.get)
    return by[limiter], limiter


# ------------------------------------------------------------------------- Triton


@dataclasses.dataclass
class Launch:
    op: str
    kernel: object
    args: tuple
    kwargs: dict


def recorded_launches(layer: Layer, dtype=torch.bfloat16) -> list[Launch]:
    """The launches the public launchers make for ``layer`` (forward, dgrad, wgrad), on meta tensors."""
    from anfast.triton import dgrad, forward, tuning, wgrad

    launches: list[Launch] = []

    class Recorder(tuning.Launcher):
        """Stands in for the autotuner: records the launch, offers the sm_90 configs."""

        def __init__(self, kernel, op, device):
            self.kernel, self.op = kernel, op

        @property
        def metas(self):
            return [config.kwargs for config in tuning.configs(self.op, (9, 0))]

        def __call__(self, grid, *args, **kwargs):
            launches.append(Launch(self.op, self.kernel, args, kwargs))
            return self.metas[0]

    out_side = (layer.side + 2 * (layer.k // 2) - layer.k) // layer.stride + 1
    meta = dict(device="meta", dtype=dtype)

    def act(channels, side):
        return torch.empty(BATCH, channels, side, side, **meta).to(memory_format=torch.channels_last)

    x_base, x_student = act(layer.c_in, layer.side), act(layer.in_student, layer.side)
    grad_base, grad_student = act(layer.c_out, out_side), act(layer.out_student, out_side)
    # A channels_last model has channels_last conv weights too: (o, kh, kw, c) in memory.
    weight = torch.empty(layer.c_out, layer.c_in, layer.k, layer.k, **meta).to(memory_format=torch.channels_last)
    pair = ((layer.stride,) * 2, (layer.k // 2,) * 2)
    with contextlib.ExitStack() as stack:
        for module in (forward, dgrad, wgrad, tuning):
            if hasattr(module, "autotuned"):
                stack.enter_context(_patched(module, "autotuned", Recorder))
        # cuDNN gives channels_last outputs for channels_last inputs (the meta device's
        # rule would give NCHW): pass them, as a CUDA launch gets them.
        forward.adjoined_conv2d_forward(x_base, x_student, weight, None, layer.out_student, *pair,
                                        out=(act(layer.c_out, out_side), act(layer.out_student, out_side)))
        dgrad.adjoined_conv2d_dgrad(grad_base, grad_student, x_base, x_student, weight, *pair)
        wgrad.adjoined_conv2d_wgrad(grad_base, grad_student, x_base, x_student, weight, *pair)
    return launches


@contextlib.contextmanager
def _patched(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def shipped_configs(op: str, arch: int) -> list[triton.Config]:
    from anfast.triton import tuning

    return tuning.configs(op, (arch // 10, arch % 10))


def compile_launch(launch: Launch, config: triton.Config, arch: int):
    """triton.compile of ``launch`` with ``config``, specialised as JITFunction.run does.

    Returns (compiled kernel, ptxas log). The binder and _pack_args are triton's own
    (runtime/jit.py), so alignment and constexpr-1 specialisation match a launch.
    """
    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    # ptxas prints its log only when it runs: a cached cubin would come back without one.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def triton_row(launch: Launch, layer: Layer, config: triton.Config, arch: int) -> dict:
    started = time.perf_counter()
    compiled, log = compile_launch(launch, config, arch)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    if not spills:
        raise RuntimeError(f"no ptxas log for {launch.kernel.__name__} {config_name(config)}:\n{log[-2000:]}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        (sass,) = split_sass(run_tool("cuobjdump", "-sass", cubin.name)).values()
        (usage,) = parse_res_usage(run_tool("cuobjdump", "-res-usage", cubin.name)).values()
    registers = usage["REG"]
    threads = compiled.metadata.num_warps * 32
    smem = compiled.metadata.shared
    ctas, limiter = occupancy(arch, registers, smem, threads)
    return {
        "backend": "triton", "arch": f"sm_{arch}", "kernel": launch.kernel.__name__, "op": launch.op,
        "layer": layer.name, "config": config_name(config), "registers": registers,
        "spill_bytes": sum(spills), "shared_bytes": smem, "threads": threads, "ctas_per_sm": ctas,
        "limited_by": limiter, **sass_summary(sass), "compile_s": round(time.perf_counter() - started, 1),
    }


def config_name(config: triton.Config) -> str:
    blocks = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    extra = "".join(f" {k}={v}" for k, v in config.kwargs.items() if not k.startswith("BLOCK_"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}{extra}"


def triton_rows(archs, layers, subset: bool, progress: Callable[[dict], None]) -> list[dict]:
    rows = []
    for layer in layers:
        for launch in recorded_launches(layer):
            for arch in archs:
                configs = shipped_configs(launch.op, arch)
                for config in configs[:1] if subset else configs:
                    row = triton_row(launch, layer, config, arch)
                    progress(row)
                    rows.append(row)
    return rows


# ------------------------------------------------------------------ CUDA extension


def extension_path() -> Optional[pathlib.Path]:
    found = sorted(glob.glob(str(pathlib.Path(__file__).resolve().parent.parent / "anfast" / "_C*.so")))
    return pathlib.Path(found[0]) if found else None


def cuda_kernel_identity(symbol: str) -> tuple[str, str, Optional[tuple[int, int, int]]]:
    """(dtype, op, threadblock tile) of an extension kernel from its mangled name: the
    first CUTLASS GemmShape in it is the mainloop's threadblock shape; op is one of
    anfast._C.kernel_resources()'s ("other" for the slice-summing kernel). The CUTLASS 3
    kernels (one tile each) are named by their variant, SM90A_VARIANT, instead of a tile."""
    dtype = "bfloat16" if "bfloat16_t" in symbol else "float16" if "half_t" in symbol else "float32"
    if "ConvUniversal" in symbol:  # CUTLASS 3, sm_90a: ConvProblemShape<conv::Operator, 2>
        operator = re.search(r"ConvProblemShapeILNS\d+_8OperatorE(\d)", symbol).group(1)
        return dtype, {"0": "forward", "1": "dgrad", "2": "wgrad"}[operator], SM90A_VARIANT
    if "wgrad_kernel" in symbol:
        op = "wgrad"
    elif "fused_conv_kernel" in symbol:
        op = "dgrad_strided" if "StridedDgrad" in symbol else "dgrad" if "Dgrad" in symbol else "forward"
    else:
        return dtype, "other", None
    shape = re.search(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E", symbol)
    return dtype, op, tuple(int(g) for g in shape.groups()) if shape else None


def extension_resources() -> dict[tuple, dict]:
    """{(dtype, op, threadblock): threads, dynamic shared bytes and the tile variants that
    run that kernel}, from anfast._C.kernel_resources() (importing it needs no GPU)."""
    import anfast._C

    kernels = {}
    for entry in anfast._C.kernel_resources():
        tile = SM90A_VARIANT if entry["tiles"] == SM90A_VARIANT else tuple(entry["threadblock"])
        kernel = kernels.setdefault((entry["dtype"], entry["op"], tile),
                                    {"threads": entry["threads"], "dynamic_shared_bytes": entry["shared_bytes"],
                                     "threadblock": tuple(entry["threadblock"]), "variants": []})
        kernel["variants"].append(entry["tiles"])
    return kernels


def extension_rows(path: pathlib.Path, archs, progress: Callable[[dict], None]) -> list[dict]:
    """Per kernel symbol and arch of the extension: its tile variants, resources (static
    plus dynamic shared memory), CTAs per SM and SASS counts."""
    kernels = extension_resources()
    rows = []
    # sm_90 also reads the sm_90a cubin (the CUTLASS 3 kernels), present when built.
    cubins = [(arch, f"sm_{arch}") for arch in archs] + [(90, "sm_90a") for arch in archs if arch == 90]
    for arch, cubin in cubins:
        try:
            usage = parse_res_usage(run_tool("cuobjdump", "-res-usage", "-arch", cubin, str(path)))
            sass = split_sass(run_tool("cuobjdump", "-sass", "-arch", cubin, str(path)))
        except subprocess.CalledProcessError as error:  # no code for this arch in the fatbinary
            if cubin != "sm_90a" or any(tile == SM90A_VARIANT for _, _, tile in kernels):
                rows.append({"backend": "cuda", "arch": cubin, "kernel": None,
                             "error": (error.stderr or "").strip()[:200]})
            continue
        for name, resources in usage.items():
            if name not in sass:
                continue
            dtype, op, tile = cuda_kernel_identity(name)
            if (cubin == "sm_90a") != (tile == SM90A_VARIANT):  # cuobjdump -arch sm_90a lists sm_90's too
                continue
            kernel = kernels.get((dtype, op, tile), {})
            shared = resources.get("SHARED", 0) + kernel.get("dynamic_shared_bytes", 0)
            ctas, limit = (occupancy(arch, resources.get("REG", 0), shared, kernel["threads"]) if kernel
                           else (None, None))
            threadblock = kernel.get("threadblock", tile) if tile else None
            config = f"{dtype} {'x'.join(map(str, threadblock))}" if threadblock else None
            if tile == SM90A_VARIANT:
                config += f" {SM90A_VARIANT}"
            row = {
                "backend": "cuda", "arch": cubin, "kernel": name, "op": op, "layer": None,
                "config": config, "dtype": dtype,
                "variants": kernel.get("variants", []), "registers": resources.get("REG", 0),
                "spill_bytes": resources.get("LOCAL", 0) + resources.get("STACK", 0),
                "shared_bytes": shared, "threads": kernel.get("threads"), "ctas_per_sm": ctas,
                "limited_by": limit, **sass_summary(sass[name]),
            }
            progress(row)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- CLI


HEADER = (f"{'backend':<7} {'arch':<6} {'op':<8} {'layer':<15} {'config':<34} {'regs':>4} {'spill':>6} "
          f"{'smem':>7} {'CTA/SM':>6} {'limit':<13} {'HGMMA':>5} {'HMMA':>5} {'LDGSTS':>6} {'TMA':>4} "
          f"{'LDSM':>4} {'BAR':>4} {'div':>4}")


def format_row(row: dict) -> str:
    if row.get("error"):
        return f"{row['backend']:<7} {row['arch']:<6} {row['error']}"
    sass = row["sass"]
    config = row["config"] or (row["kernel"] or "")[:34]
    division = "-" if row["main_loop_division_ops"] is None else row["main_loop_division_ops"]
    return (f"{row['backend']:<7} {row['arch']:<6} {row['op']:<8} {(row['layer'] or ''):<15} {config:<34} "
            f"{row['registers']:>4} {row['spill_bytes']:>6} {row['shared_bytes']:>7} "
            f"{row['ctas_per_sm'] if row['ctas_per_sm'] is not None else '-':>6} {(row['limited_by'] or '-'):<13} "
            f"{sass['HGMMA']:>5} {sass['HMMA']:>5} {sass['LDGSTS']:>6} {sass['UTMALDG']:>4} {sass['LDSM']:>4} "
            f"{sass['BAR']:>4} {division:>4}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true",
                        help="the first config of each kernel on one layer (a quick CPU check)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this arch (repeatable)")
    parser.add_argument("--backend", choices=("triton", "cuda"), action="append",
                        help="only this backend's kernels (repeatable; default: both)")
    parser.add_argument("--out", help="JSON path (default results/kernel_report-<date>.json)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    layers = LAYERS[:1] if args.subset else LAYERS
    print(HEADER, flush=True)

    def progress(row):
        print(format_row(row), flush=True)

    started = time.perf_counter()
    env = environment("cpu")  # the commit whose kernels are compiled, taken before any edit
    backends = set(args.backend or ("triton", "cuda"))
    rows = triton_rows(archs, layers, args.subset, progress) if "triton" in backends else []
    extension = extension_path() if "cuda" in backends else None
    if extension is not None:
        rows += extension_rows(extension, archs, progress)
    elif "cuda" in backends:
        print("cuda    (anfast/_C*.so not built: no extension rows)")
    compiled = [r for r in rows if not r.get("error")]
    summary = {
        "rows": len(compiled),
        "spilling": sum(r["spill_bytes"] > 0 for r in compiled),
        "sm90_triton_without_hgmma": sum(r["backend"] == "triton" and r["arch"] == "sm_90"
                                         and r["sass"]["HGMMA"] == 0 for r in compiled),
        "triton_one_cta_per_sm": sum(r["backend"] == "triton" and r["ctas_per_sm"] == 1 for r in compiled),
        "cuda_variant_kernels": sum(bool(r.get("variants")) for r in compiled),
        "cuda_variant_kernels_spilling": sum(bool(r.get("variants")) and r["spill_bytes"] > 0 for r in compiled),
        "sm90a_kernels": sum(r["arch"] == "sm_90a" for r in compiled),
        "sm90a_kernels_without_hgmma_or_tma": sum(r["arch"] == "sm_90a" and not (r["sass"]["HGMMA"] and r["sass"]["UTMALDG"])
                                                  for r in compiled),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"summary: {summary['rows']} kernels compiled, {summary['spilling']} spill, "
          f"{summary['sm90_triton_without_hgmma']} sm_90 Triton configs without HGMMA, "
          f"{summary['triton_one_cta_per_sm']} Triton configs at 1 CTA/SM, {summary['sm90a_kernels']} sm_90a "
          f"kernels ({summary['sm90a_kernels_without_hgmma_or_tma']} without HGMMA or TMA); {summary['seconds']} s")
    if not args.no_write:
        payload = {
            "benchmark": "kernel_report", **env,
            "batch": BATCH, "dtype": "bfloat16", "memory_format": "channels_last",
            "layers": [dataclasses.asdict(layer) for layer in layers], "subset": args.subset,
            "backends": sorted(backends),
            "extension": str(extension.name) if extension else None, "arch_limits": ARCH_LIMITS,
            "summary": summary, "rows": rows,
        }
        out = pathlib.Path(args.out) if args.out else RESULTS / f"kernel_report-{datetime.date.today()}.json"
        from common import write_result

        print(f"wrote {write_result('kernel_report', payload, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
