"""Fused adjoined conv vs two cuDNN convs, on every conv shape of ResNet-50.

Question: how fast is one fused base+student pass (forward, dgrad, wgrad) against
what it replaces, two cuDNN convolutions (the base, and the sliced weight on the
student input: the "torch" backend, anfast.ops.reference) and torch.compile of
those? Student widths follow the paper's rule for ResNet-50: a conv whose in and
out channels are both > 64 gets width(C, alpha) = min(C, round_up(ceil(C/alpha), 8))
channels; other convs keep full width.

Shapes come from torchvision's resnet50 (forward hooks on a meta-device run), not a
hand-typed table. Identical shapes are timed once and weighted by their count.
Times are triton.testing.do_bench medians (with 20% / 80% quantiles) in ms, per phase:
forward, dgrad (both inputs' gradients), wgrad (the shared weight's), backward (both
gradients in one call, as autograd asks) and total (forward + backward).

    python benchmarks/conv.py                   # batch 256, alpha 4, bf16
    python benchmarks/conv.py --quick --batch 64
    python benchmarks/conv.py --layers 'layer1.0.conv2' 'layer3.0.conv2'

GPU only: on a machine without CUDA it exits with a message.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_result  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense (no sparsity) bf16 / fp16 tensor-core peaks in TFLOP/s, from NVIDIA's data
# sheets: H100 SXM and H200 989, A100 312. Matched on torch.cuda.get_device_name().
HALF_PEAK_TFLOPS = [("H200", 989.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0), ("A100", 312.0)]
QUANTILES = [0.5, 0.2, 0.8]
# Backward output masks (dx_base, dx_student, dweight, dbias) of each backward phase.
BACKWARD_PHASES = {"dgrad": (True, True, False, False), "wgrad": (False, False, True, False),
                   "backward": (True, True, True, False)}
PHASES = ("forward", "dgrad", "wgrad", "backward", "total")
# The --quick set: the stem, a 1x1 and a 3x3 of layer1 (full width), a strided 3x3 of layer3.
QUICK_LAYERS = ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer3.0.conv2")


@dataclass(frozen=True)
class ConvShape:
    """One conv layer's problem at the benchmark's batch and student widths."""

    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    height: int
    width: int
    in_student: int
    out_student: int

    def output_size(self) -> tuple[int, int]:
        h = (self.height + 2 * self.padding - self.kernel) // self.stride + 1
        w = (self.width + 2 * self.padding - self.kernel) // self.stride + 1
        return h, w

    def forward_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the base and the student convolutions."""
        h, w = self.output_size()
        taps = self.kernel * self.kernel
        return 2 * batch * h * w * taps * (self.c_out * self.c_in + self.out_student * self.in_student)


def resnet50_conv_shapes(alpha: float, round_to: int = 8) -> list[tuple[list[str], ConvShape]]:
    """Every conv of torchvision resnet50 at 224x224 adjoined as training adjoins it
    (``anfast.adjoin``, paper policy): (layer names, shape), deduplicated.

    The student widths are adjoin's, not a per-layer rule: a conv's student input is what
    its producer's student outputs (layer2.0.conv1 shrinks, yet reads layer1's full 256
    channels). The stem's student shares the image (input_shared: training computes it once
    with the base); it is listed as its own problem, x_student the image's 3 channels.
    """
    import anfast
    from anfast.nn import AdjoinedConv2d

    network = anfast.adjoin("resnet50", alpha=alpha, policy="paper", round_to=round_to,
                            input_size=(3, 224, 224), backend="torch")
    found: dict[ConvShape, list[str]] = {}

    def hook(name):
        def record(module, inputs):
            shape = ConvShape(
                module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                module.padding[0], inputs[0].shape[2], inputs[0].shape[3],
                module.student_in_channels[0], module.student_out_channels[0])
            found.setdefault(shape, []).append(name)
        return record

    for name, module in network.named_modules():
        if isinstance(module, AdjoinedConv2d):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        network.eval()(torch.zeros(1, 3, 224, 224))
    return [(names, shape) for shape, names in found.items()]


def half_peak_tflops(device_name: str) -> float | None:
    for key, peak in HALF_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def select_shapes(shapes: list[tuple[list[str], ConvShape]], patterns) -> list[tuple[list[str], ConvShape]]:
    """The shapes any of whose layer names matches one of the fnmatch ``patterns``."""
    chosen = [(names, s) for names, s in shapes
              if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)]
    if not chosen:
        raise SystemExit(f"benchmarks/conv.py: no ResNet-50 conv matches {list(patterns)}; layer names "
                         f"look like conv1, layer1.0.conv2, layer3.0.downsample.0")
    return chosen


def make_problem(shape: ConvShape, batch: int, dtype: torch.dtype, device: str = "cuda"):
    from anfast.ops import ConvProblem

    def randn(*size, channels_last=True):
        t = torch.randn(*size, device=device, dtype=dtype)
        return t.to(memory_format=torch.channels_last) if channels_last else t

    x_base = randn(batch, shape.c_in, shape.height, shape.width)
    x_student = randn(batch, shape.in_student, shape.height, shape.width)
    weight = randn(shape.c_out, shape.c_in, shape.kernel, shape.kernel) * 0.05
    h, w = shape.output_size()
    grad_base = randn(batch, shape.c_out, h, w)
    grad_student = randn(batch, shape.out_student, h, w)
    # The problem of a conv inside a channels_last training network (its weight channels_last
    # too, gradients for both inputs and the weight): the tuning key `anfast tune` records,
    # so a fused backend runs the kernel variant the tune found fastest for this layer.
    problem = ConvProblem(x_base, x_student, weight, None, shape.out_student, (shape.stride,) * 2,
                          (shape.padding,) * 2, (1, 1), 1, None, (True, True, True, False))
    return problem, grad_base, grad_student


def variant_run(provider: str, problem) -> str | None:
    """The kernel variant a fused provider runs on ``problem``: the tune's choice, "default"
    where the tuning cache holds none; None for a provider without variants."""
    from anfast.ops import tuning

    backend = provider.removeprefix("fused-")
    if backend == provider or backend != "cuda":
        return None
    return tuning.decided_variant(problem, backend) or "default"


def providers(problem, compiled: bool = True) -> dict:
    """name -> (forward(), backward(grad_base, grad_student, output_mask)) for every provider
    that can run ``problem``; ``compiled`` adds torch.compile of the reference."""
    from anfast.ops import BACKEND_PRIORITY, BackendUnavailable, get_backend
    from anfast.ops.reference import adjoined_conv2d_backward_reference, adjoined_conv2d_reference

    found = {}
    for name in BACKEND_PRIORITY:
        if name == "torch":
            continue
        try:
            backend = get_backend(name)
        except BackendUnavailable as error:
            print(f"  (backend {name}: {error})", file=sys.stderr)
            continue
        reasons = backend.unsupported_reasons(problem, explicit=True)
        if reasons:
            print(f"  (backend {name}: {'; '.join(reasons)})", file=sys.stderr)
            continue
        found[f"fused-{name}"] = (lambda b=backend: b.forward(problem),
                                  lambda g_b, g_s, mask, b=backend: b.backward(g_b, g_s, problem, mask))

    p = problem
    conv_args = (p.out_student, p.stride, p.padding, p.dilation, p.groups, None)

    def forward():
        return adjoined_conv2d_reference(p.x_base, p.x_student, p.weight, None, *conv_args)

    def backward(grad_base, grad_student, mask):
        return adjoined_conv2d_backward_reference(grad_base, grad_student, p.x_base, p.x_student, p.weight,
                                                  False, *conv_args, mask)

    found["cudnn-x2"] = (forward, backward)
    if not compiled:
        return found
    compiled_forward = torch.compile(adjoined_conv2d_reference, dynamic=False)
    compiled_backward = torch.compile(adjoined_conv2d_backward_reference, dynamic=False)
    found["cudnn-x2-compiled"] = (
        lambda: compiled_forward(p.x_base, p.x_student, p.weight, None, *conv_args),
        lambda g_b, g_s, mask: compiled_backward(g_b, g_s, p.x_base, p.x_student, p.weight, False,
                                                 *conv_args, mask),
    )
    return found


def phase_calls(forward, backward, grad_base, grad_student) -> dict:
    """phase name -> a no-argument call that runs that phase once."""
    calls = {"forward": forward}
    for phase, mask in BACKWARD_PHASES.items():
        calls[phase] = functools.partial(backward, grad_base, grad_student, mask)

    def total():
        forward()
        backward(grad_base, grad_student, BACKWARD_PHASES["backward"])

    calls["total"] = total
    return calls


def time_provider(forward, backward, grad_base, grad_student) -> dict:
    from triton.testing import do_bench

    times = {}
    for phase, fn in phase_calls(forward, backward, grad_base, grad_student).items():
        median, low, high = do_bench(fn, quantiles=QUANTILES)
        times[phase] = {"median_ms": median, "p20_ms": low, "p80_ms": high}
    return times


def geometric_mean(values: list[float], weights: list[int]) -> float:
    return math.exp(sum(w * math.log(v) for v, w in zip(values, weights)) / sum(weights))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", default="",
                        help="JSON path (default benchmarks/results/conv-<device>-<date>.json)")
    parser.add_argument("--quick", action="store_true",
                        help=f"time 4 representative layer shapes only: {', '.join(QUICK_LAYERS)}")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile of the two cuDNN convs (cudnn-x2-compiled; "
                             "compiles twice per shape)")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN",
                        help="time only the shapes of these layers (fnmatch patterns on names such "
                             "as layer1.0.conv2)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/conv.py: no CUDA device visible; this benchmark times GPU kernels and has "
              "nothing to measure on a CPU. Run it on a GPU machine (see benchmarks/gpu_check.sh).",
              file=sys.stderr)
        return 2
    import triton

    # One compiled graph per layer shape: lift dynamo's recompile limit (default 8) so the
    # compiled baseline never falls back to eager halfway through ResNet-50.
    torch._dynamo.config.cache_size_limit = 256
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name()
    peak = half_peak_tflops(device_name) if dtype != torch.float32 else None
    shapes = resnet50_conv_shapes(args.alpha)
    if args.quick or args.layers:
        shapes = select_shapes(shapes, (args.layers or []) + (list(QUICK_LAYERS) if args.quick else []))

    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"conv-{device_name.replace(' ', '_')}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    header_fields = {
        "benchmark": "conv", **environment("cuda"), "cuda": torch.version.cuda, "args": vars(args),
        "peak_tflops": peak,
    }

    def write_json(rows, complete):
        # Written (atomically) after every layer, so a run cut short by a time limit keeps its rows.
        write_result("conv", {**header_fields, "complete": complete, "rows": rows,
                              "summary": summarize(rows)}, out)

    rows = []
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, batch {args.batch}, "
          f"alpha {args.alpha:g}, {args.dtype}, channels_last")
    header = f"{'layer':<18}{'shape (Cin>Cout k s HxW | cin>cout)':<38}{'provider':<20}" \
             f"{'fwd ms':>9}{'dgrad ms':>9}{'wgrad ms':>9}{'bwd ms':>9}{'total ms':>10}{'TFLOP/s':>9}" \
             f"{'% floor':>9}"
    print(header)
    for names, shape in shapes:
        problem, grad_base, grad_student = make_problem(shape, args.batch, dtype)
        forward_flops = shape.forward_flops(args.batch)
        # dgrad and wgrad are each a forward's worth of multiply-adds.
        flops = {"forward": forward_flops, "dgrad": forward_flops, "wgrad": forward_flops,
                 "backward": 2 * forward_flops, "total": 3 * forward_flops}
        for provider, (forward, backward) in providers(problem, compiled=args.compiled).items():
            times = time_provider(forward, backward, grad_base, grad_student)
            tflops = {phase: flops[phase] / (times[phase]["median_ms"] * 1e-3) / 1e12 for phase in flops}
            row = {
                "layers": names, "count": len(names), "shape": asdict(shape), "provider": provider,
                "variant": variant_run(provider, problem),
                "batch": args.batch, "dtype": args.dtype, "times": times, "flops": flops, "tflops": tflops,
                "percent_of_floor": (None if peak is None
                                     else {phase: 100.0 * t / peak for phase, t in tflops.items()}),
            }
            rows.append(row)
            desc = (f"{shape.c_in}>{shape.c_out} {shape.kernel} {shape.stride} {shape.height}x{shape.width}"
                    f" | {shape.in_student}>{shape.out_student}")
            floor = "unknown" if peak is None else f"{row['percent_of_floor']['total']:.1f}"
            print(f"{names[0]:<18}{desc:<38}{provider:<20}"
                  + "".join(f"{times[phase]['median_ms']:>9.3f}" for phase in ("forward", "dgrad", "wgrad",
                                                                                 "backward"))
                  + f"{times['total']['median_ms']:>10.3f}{tflops['total']:>9.1f}{floor:>9}")
        del problem, grad_base, grad_student
        torch.cuda.empty_cache()
        write_json(rows, complete=False)

    summary = summarize(rows)
    for line in summary:
        print(f"geomean {line['provider']} / cudnn-x2 over {line['layers']} layers: "
              + ", ".join(f"{phase} {line[f'{phase}_ratio']:.3f}" for phase in PHASES)
              + " (< 1: fused is faster)")

    write_json(rows, complete=True)
    print(f"wrote {out}")
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    """Per fused provider: count-weighted geometric means of its time / cudnn-x2's time."""
    if not rows:
        return []
    baseline = {json.dumps(r["shape"], sort_keys=True): r for r in rows if r["provider"] == "cudnn-x2"}
    summary = []
    for provider in sorted({r["provider"] for r in rows} - {"cudnn-x2"}):
        mine = [r for r in rows if r["provider"] == provider]
        pairs = [(r, baseline[json.dumps(r["shape"], sort_keys=True)]) for r in mine]
        weights = [r["count"] for r, _ in pairs]
        line = {"provider": provider, "layers": sum(weights)}
        for phase in PHASES:
            ratios = [r["times"][phase]["median_ms"] / b["times"][phase]["median_ms"] for r, b in pairs]
            line[f"{phase}_ratio"] = geometric_mean(ratios, weights)
        summary.append(line)
    return summary


if __name__ == "__main__":
    sys.exit(main())
