"""What one training step asks of the device: FLOPs, operator calls and memory traffic.

Question: why is an AN step slower than its FLOPs say? On the H200, plain ResNet-50
training ran at 4667 img/s and AN (paper policy, alpha 4, torch backend, which auto also
chose there) at 2629: 1.78x the time for (as counted here) 1.23x the FLOPs. This counts,
per provider of train_throughput.py, what one forward + backward pass at the benchmark's
shape dispatches, without running it: the model and batch live on the meta device
(shapes only, no memory, no compute), so ResNet-50 at batch 256 and 224 px is counted
in seconds on any machine.

  flops               torch.utils.flop_counter (a multiply-add is 2), forward and backward
  calls               operator calls by kind: "gemm" (conv, conv backward, matmul, and
                      anfast's adjoined conv ops) and "other" (batch norm, ReLU, residual
                      adds, pooling, loss, ...). On a GPU each call is one or more kernels.
  elements            tensor elements each call reads or writes (inputs + outputs);
                      "other" calls do a few operations per element, so their time is
                      their traffic: elements x bytes per element / memory bandwidth.
  most_called,        the 12 operators called most, and the 12 that touch the most
  most_elements       elements (GEMM-like or not): where a provider's traffic goes.

Views and allocations move no data and are not counted. The optimizer step is left
out (its traffic is a few passes over the weights, the same for every provider).

With --launches, each provider also runs whole training steps (train_throughput's step:
forward, backward, fused SGD) on --device, eager and under torch.compile, and
torch.profiler counts what one step launches:

  launches            on CUDA: kernels (and memcpy / memset) on the device; on the CPU:
                      inductor's generated kernels plus the outermost aten operators that
                      compute (views and allocations left out), one per CUDA kernel launch
                      they would be on a GPU, give or take the kernels one aten op runs

    python benchmarks/step_census.py                       # ResNet-50, batch 256, 224 px
    python benchmarks/step_census.py --throughput benchmarks/results/train_throughput-nvidia-h200-2026-11-26.json
    python benchmarks/step_census.py --launches --device cpu --launch-batch-size 8 --launch-image-size 64

With --throughput, the measured step times of a train_throughput.py JSON (same arch,
batch and image size) are set beside the counts. Writes
benchmarks/results/step_census-<arch>-<policy>-<machine>-<date>.json, or
OUT/step_census.json with --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import functools

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import anfast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_model, environment, write_result  # noqa: E402
from train_throughput import build_providers  # noqa: E402

from anfast.data.synthetic import synthetic_batch  # noqa: E402
from anfast.train.step import StepMeter, train_step, warm_up  # noqa: E402

GEMM_OPS = frozenset({"convolution", "convolution_backward", "mm", "addmm", "bmm",
                      "adjoined_conv2d", "adjoined_conv2d_backward"})
# Calls that move no data: views, metadata, allocations.
FREE_OPS = frozenset({"view", "_unsafe_view", "t", "permute", "expand", "detach", "slice", "alias",
                      "as_strided", "transpose", "unsqueeze", "squeeze", "select", "unbind", "split",
                      "split_with_sizes", "narrow",
                      "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                      "lift_fresh"})


class OpCensus(TorchDispatchMode):
    """Counts operator calls and the tensor elements each reads or writes, by kind."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.elements: collections.Counter = collections.Counter()
        self.by_op: collections.Counter = collections.Counter()
        self.elements_by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if name in FREE_OPS:
            return out
        kind = "gemm" if name in GEMM_OPS else "other"
        touched = sum(t.numel() for t in tree_flatten((args, kwargs, out))[0]
                      if isinstance(t, torch.Tensor))
        self.calls[kind] += 1
        self.elements[kind] += touched
        self.by_op[name] += 1
        self.elements_by_op[name] += touched
        return out


def census(model: torch.nn.Module, loss_fn, *, batch_size: int, image_size: int,
           num_classes: int, channels_last: bool, device: str = "meta") -> dict:
    """FLOPs, calls and elements of one forward + backward pass of ``model``.

    On "meta" (the default) nothing is computed or allocated; ``model`` is moved there.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    forward_flops, backward_flops = FlopCounterMode(display=False), FlopCounterMode(display=False)
    ops = OpCensus()
    with ops:
        with forward_flops:
            loss = loss_fn(model(images), labels)
        with backward_flops:
            loss.backward()
    forward, backward = forward_flops.get_total_flops(), backward_flops.get_total_flops()
    return {"flops": {"forward": forward, "backward": backward, "total": forward + backward},
            "calls": dict(ops.calls), "elements": dict(ops.elements),
            "most_called": dict(ops.by_op.most_common(12)),
            "most_elements": dict(ops.elements_by_op.most_common(12))}


def _is_launch(event, on_cuda: bool) -> bool:
    """A profiler event that is one kernel launch (see the module docstring). On CUDA only
    the device's own events count: the host's aten ops and inductor's launcher records
    (named after the Triton kernel they launch) are the same launches seen from the CPU."""
    if on_cuda:
        return (event.device_type == torch.autograd.DeviceType.CUDA
                and not getattr(event, "is_user_annotation", False))
    name = event.name
    if "cpp_fused" in name or name.startswith("triton_"):
        return True  # a kernel inductor generated
    if not name.startswith("aten::") or name[len("aten::"):] in FREE_OPS:
        return False
    parent = event.cpu_parent
    while parent is not None:  # an aten op inside another one is part of its launch
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def launch_census(model: torch.nn.Module, loss_fn, *, compiled: bool, batch_size: int,
                  image_size: int, num_classes: int, channels_last: bool,
                  device: torch.device) -> int:
    """Kernel launches of one whole training step (train_throughput's: forward, backward,
    fused SGD), eager or under torch.compile, after warm-up steps."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    images, labels = synthetic_batch(batch_size, image_size, num_classes, device=device,
                                     channels_last=channels_last)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    forward = model
    if compiled:
        warm_up(model, loss_fn, batch_size=batch_size, image_size=image_size,
                num_classes=num_classes, channels_last=channels_last, amp_dtype=amp_dtype,
                device=device)
        torch._dynamo.reset()
        forward = torch.compile(model)
    step = functools.partial(
        train_step, forward, images, labels, loss_fn=loss_fn,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True),
        scaler=torch.amp.GradScaler(device.type, enabled=False), parameters=list(model.parameters()),
        amp_dtype=amp_dtype, meter=StepMeter(device, max_bad_steps=0, step=0))
    for _ in range(2):  # compile, tune, allocate
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}), profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sum(1 for event in prof.events() if _is_launch(event, device.type == "cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50",
                        help="a torchvision model, or timm:NAME for a timm one (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--policy", default="paper",
                        help="width policy of the anfast providers (the masked one is always the "
                             "paper's; default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--providers", default="base,anfast_torch,masked",
                        help="comma list of train_throughput.py's providers (default: %(default)s)")
    parser.add_argument("--throughput", type=Path, default=None,
                        help="a train_throughput.py JSON whose measured step times to set beside "
                             "the counts (same arch, alpha, policy, batch size and image size)")
    parser.add_argument("--launches", action="store_true",
                        help="also count the kernel launches of one real training step per "
                             "provider, eager and compiled, on --device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where --launches runs its steps (default: %(default)s)")
    parser.add_argument("--launch-batch-size", type=int, default=None,
                        help="batch of the --launches steps (default: --batch-size on CUDA, 8 on the CPU)")
    parser.add_argument("--launch-image-size", type=int, default=None,
                        help="image size of the --launches steps (default: --image-size on CUDA, 64 on the CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON (default: benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    launch_batch = args.launch_batch_size or (args.batch_size if device.type == "cuda" else 8)
    launch_size = args.launch_image_size or (args.image_size if device.type == "cuda" else 64)

    measured = None
    if args.throughput is not None:
        measured = json.loads(args.throughput.read_text())
        mismatched = [f"{key} {measured.get(key)} (here {value})" for key, value in
                      (("arch", args.arch), ("batch_size", args.batch_size),
                       ("image_size", args.image_size), ("alpha", args.alpha),
                       ("policy", args.policy))
                      if measured.get(key) != value]
        if mismatched:
            parser.error(f"--throughput {args.throughput} measured another problem: "
                         + ", ".join(mismatched))
    providers = build_providers(base_model(args.arch, args.num_classes), args.alpha, args.num_classes,
                                (3, args.image_size, args.image_size), policy=args.policy)
    names = [name.strip() for name in args.providers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(providers))
    if unknown or not names:
        parser.error(f"--providers {args.providers}: choose from {', '.join(providers)}")

    def write(rows: dict) -> Path:
        """The JSON of what is counted so far: after the meta census and after each
        provider's launches, so a run its time limit ends (a GPU lease's) keeps them."""
        result = {
            "benchmark": "step_census",
            "question": "what one training step (forward + backward) dispatches, per provider: FLOPs, "
                        "operator calls and tensor elements touched, counted on the meta device",
            **env,
            "arch": args.arch, "alpha": args.alpha, "policy": args.policy, "image_size": args.image_size,
            "batch_size": args.batch_size, "num_classes": args.num_classes,
            "channels_last": args.channels_last, "counted_on": "meta device (no compute)",
            "launches_on": ({"device": str(device), "batch_size": launch_batch, "image_size": launch_size,
                             **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}
                            if args.launches else None),
            "launches_done": [f"{name}/{mode}" for mode in ("eager", "compiled")
                              for name, row in rows.items() if mode in row.get("launches", {})],
            "measured_step_times_from": None if args.throughput is None else str(args.throughput),
            "measured_on": None if measured is None else measured.get("device"),
            "providers": rows, "ratios_to_base": ratios_to_base(rows), "anfast_version": anfast.__version__,
        }
        return write_result(f"step_census-{args.arch.replace(':', '-')}-{args.policy}", result,
                            None if args.out is None else args.out / "step_census.json")

    env = environment("cpu")
    rows = {}
    for name in names:
        model, loss_fn = providers[name]
        rows[name] = census(model, loss_fn, batch_size=args.batch_size, image_size=args.image_size,
                            num_classes=args.num_classes, channels_last=args.channels_last)
        if measured is not None and name in measured["providers"]:
            rows[name]["measured_step_s"] = measured["providers"][name]["median_step_s"]
        print(f"{name}: {rows[name]['flops']['total'] / 1e12:.2f} TFLOP, calls {rows[name]['calls']}, "
              f"elements {rows[name]['elements']}", flush=True)
    path = write(rows)
    if args.launches:  # fresh models: the census moved the first ones to the meta device
        live = build_providers(base_model(args.arch, args.num_classes), args.alpha, args.num_classes,
                               (3, launch_size, launch_size), policy=args.policy)
        # Every provider's eager step first, then the compiled ones (each a cold compile),
        # the JSON written after each count: a run its time limit ends keeps the eager row.
        for mode in ("eager", "compiled"):
            for name in names:
                model, loss_fn = live[name]
                rows[name].setdefault("launches", {})[mode] = launch_census(
                    model, loss_fn, compiled=mode == "compiled", batch_size=launch_batch,
                    image_size=launch_size, num_classes=args.num_classes,
                    channels_last=args.channels_last, device=device)
                print(f"{name}: launches per step {rows[name]['launches']}", flush=True)
                path = write(rows)
    print(json.dumps(ratios_to_base(rows), indent=2))
    print(f"wrote {path}")


def ratios_to_base(rows: dict) -> dict:
    """Each provider against plain training, the floor (DESIGN: ratios, not absolutes);
    launch ratios where both were counted."""
    base = rows.get("base")
    ratios = {}
    if base is None:
        return ratios
    for name, row in rows.items():
        if name == "base":
            continue
        ratios[name] = {
            "flops": row["flops"]["total"] / base["flops"]["total"],
            "gemm_calls": row["calls"]["gemm"] / base["calls"]["gemm"],
            "other_calls": row["calls"]["other"] / base["calls"]["other"],
            "other_elements": row["elements"]["other"] / base["elements"]["other"],
        }
        for mode in ("eager", "compiled"):
            if mode in row.get("launches", {}) and mode in base.get("launches", {}):
                ratios[name][f"launches_{mode}"] = row["launches"][mode] / base["launches"][mode]
        if "measured_step_s" in row and "measured_step_s" in base:
            ratios[name]["measured_step_time"] = row["measured_step_s"] / base["measured_step_s"]
    return ratios


if __name__ == "__main__":
    main()
