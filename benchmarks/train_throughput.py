"""Training img/s: plain base vs anfast AN vs the authors' masked formulation, one run.

Question: how much faster is an AN training step when the student is computed at its
real width (anfast) than in the authors' public code, which computes the student at
FULL width and zeroes its trailing channels after each conv (so the student costs
what the base costs)? Plain base training is the floor both are compared against.

Providers, all with fused SGD, the same model, data and precision:
  base          torchvision model, cross-entropy
  anfast        anfast.adjoin(model, alpha, policy) + anfast.AdjoinedLoss, backend auto
                (on CUDA prepared as `anfast train` does: tuned, or read from the tune cache,
                and the convs decided for torch pinned to it)
  anfast_torch  the same with backend="torch" (two cuDNN / ATen convs, no fused kernel)
  anfast_aten   the same adjoined network with every AdjoinedConv2d's forward replaced by
                F.conv2d per network on its weight slice: what the op path costs beyond
                the two convolutions themselves (its checks, the backend choice)
  anfast_streams  anfast_torch with each student on its own CUDA stream
                (anfast.use_streams; on the CPU the same path as anfast_torch)
  masked        the base plus a full-width student that shares the conv / linear modules
                (so the same weights), has its own BatchNorms, and multiplies every shrunk
                conv's output by a 0/1 channel mask of width(C, alpha); same AdjoinedLoss
  dan           one step of a DAN width search (`anfast search`, anfast.dan): the adjoined
                network at alpha 1, policy "all", torch backend, its full-width student
                masked by Gumbel-softmax gates over the choices 1, 2, 4, 8 of every width
                group, the search's loss (AdjoinedLoss + the expected FLOPs penalty, target
                0.4) and the architecture logits' Adam step after the warm-up; what a
                search costs against plain and AN training
and each again per --compile mode: torch.compile modes ("+default", "+reduce-overhead"),
and "graphs", the whole eager step captured as one CUDA graph (anfast.train.graphs, as
`anfast train --cuda-graphs`; CUDA only, not for anfast_streams, nor for dan: a search
refuses --cuda-graphs).

Every step is the trainer's own (anfast.train.step.train_step: no host read inside)
on `anfast train --data synthetic`'s batch (anfast.data.synthetic: one random batch
made once on the device). A round runs --steps steps of one provider and synchronizes
once; rounds alternate the providers so a machine whose load drifts affects all of
them alike; the median round gives a provider's img/s. On CUDA: bf16 autocast and
channels_last.

    python benchmarks/train_throughput.py                       # CPU: ResNet-50, 64 px, batch 8
    python benchmarks/train_throughput.py --device cuda --image-size 224 --batch-size 256 \
        --compile off,default,reduce-overhead

Writes benchmarks/results/train_throughput-<device>-<date>.json, or
OUT/train_throughput.json with --out OUT (a directory), after each key's warm-up (its
seconds: compiles and captures included; on CUDA the peak memory during it) and again after every
round, so a run cut short keeps its rounds ("rounds_done"). Keys warm up eager first,
then compiled, then as CUDA graphs (whose memory pools stay held); one that fails (out
of memory, a compile or capture error) is named under "errors" and the others go on.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import anfast
from anfast.adjoin import PAPER_MIN_CHANNELS
from anfast.dan import ChoiceGates, CostModel, DEFAULT_CHOICES, SearchConfig, SearchSpace
from anfast.dan.search import GatedNetwork, SearchLoss
from anfast.nn import AdjoinedConv2d
from anfast.data.synthetic import DEFAULT_SYNTHETIC_CLASSES, synthetic_batch
from anfast.train.config import COMPILE_CHOICES
from anfast.train.graphs import CapturedStep, step_state_tensors, tensor_learning_rates
from anfast.train.step import StepMeter, resolve_compile, train_step, warm_up
from anfast.nn.backends import prepare_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_model, environment, write_result  # noqa: E402


class MaskedConv2d(nn.Module):
    """The authors' student conv: the shared full-width conv, trailing channels zeroed."""

    def __init__(self, conv: nn.Conv2d, kept_channels: int):
        super().__init__()
        self.conv = conv  # the base's module itself: shared weights, full-width cost
        mask = torch.zeros(1, conv.out_channels, 1, 1)
        mask[:, :kept_channels] = 1
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.mask


def masked_student(base: nn.Module, alpha: float, round_to: int) -> nn.Module:
    """A full-width student of ``base`` per the paper policy (convs with in and out > 64)."""
    student = copy.deepcopy(base)  # private BatchNorms, as in the paper
    for name, module in base.named_modules():
        if isinstance(module, nn.Conv2d):
            shrinks = min(module.in_channels, module.out_channels) > PAPER_MIN_CHANNELS
            kept = (anfast.student_width(module.out_channels, alpha, round_to) if shrinks
                    else module.out_channels)
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, MaskedConv2d(module, kept))
        elif isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, module)
    return student


class MaskedAdjoined(nn.Module):
    """Base and masked student in one module whose output is an AdjoinedOutput."""

    def __init__(self, base: nn.Module, alpha: float, round_to: int):
        super().__init__()
        self.base = base
        self.student = masked_student(base, alpha, round_to)

    def forward(self, x):
        return anfast.AdjoinedOutput(self.base(x), (self.student(x),))


PROVIDERS = ("base", "anfast", "anfast_torch", "anfast_aten", "anfast_streams", "masked", "dan")
GRAPHS = "graphs"  # a --compile entry: the whole eager step as one CUDA graph
# (numerator, denominator) of the img/s ratios reported per compile mode.
RATIOS = (("anfast", "masked"), ("anfast_torch", "masked"), ("anfast", "anfast_torch"), ("anfast", "base"),
          ("anfast_torch", "base"), ("masked", "base"), ("anfast", "anfast_aten"), ("anfast_aten", "base"), ("anfast_streams", "base"),
          ("anfast_streams", "anfast"), ("dan", "base"), ("dan", "anfast_torch"), ("dan", "masked"))
# The search the dan provider steps: its FLOPs target and its gates' temperature.
DAN_TARGET_FLOPS, DAN_TAU = 0.4, 1.0


def _aten_forward(conv: AdjoinedConv2d, x_base: torch.Tensor, *x_students: torch.Tensor):
    """AdjoinedConv2d's outputs from plain F.conv2d on each network's weight slice."""
    if conv.input_shared:
        y_base = F.conv2d(x_base, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                          conv.groups)
        return (y_base, *(y_base[:, :c] for c in conv.student_out_channels))
    return tuple(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
                 for n, x in enumerate((x_base, *x_students))
                 for weight, bias, groups in [conv.network_weight(n)])


def aten_adjoined(network: nn.Module) -> nn.Module:
    """``network`` with each adjoined conv computed by plain aten convolutions."""
    for module in network.modules():
        if isinstance(module, AdjoinedConv2d):
            module.forward = functools.partial(_aten_forward, module)
    return network


def search_provider(base: nn.Module, input_size, device: torch.device) -> tuple:
    """(GatedNetwork, its loss) of a DAN search of ``base``, built as anfast.dan.Search
    builds them: alpha 1, policy "all", the default choices, the cost model on ``device``."""
    network = anfast.adjoin(copy.deepcopy(base), alpha=1, policy="all", round_to=8,
                            input_size=input_size, backend="torch")
    space = SearchSpace.from_network(network, DEFAULT_CHOICES, 8)
    cost_model = CostModel(network, space, input_size).to(device)
    gated = GatedNetwork(network, space, ChoiceGates(space).to(device))
    gated.tau.fill_(DAN_TAU)
    loss = SearchLoss(cost_model, {"flops": DAN_TARGET_FLOPS}, SearchConfig.gamma, device)
    return gated, functools.partial(loss, lambda_=1.0)


def build_providers(arch: str | torch.nn.Module, alpha: float, num_classes: int, input_size,
                    policy: str = "paper", device: torch.device = torch.device("cpu")) -> dict:
    """name -> (model, loss_fn(output, target)), all from the same initial weights.

    ``arch`` is a torchvision model name, or the base network itself (whose classifier
    then has its own number of classes); ``policy`` is the anfast providers' width policy;
    the masked student is the paper's; the search's step (dan) keeps its cost model and
    loss sums on ``device``.
    """
    torch.manual_seed(0)
    base = arch if isinstance(arch, torch.nn.Module) else \
        torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    adjoined = {key: anfast.adjoin(copy.deepcopy(base), alpha=alpha, policy=policy, round_to=8,
                                   input_size=input_size, backend=backend)
                for key, backend in ((None, None), ("torch", "torch"), ("aten", "torch"),
                                     ("streams", "torch"))}
    masked = MaskedAdjoined(copy.deepcopy(base), alpha, 8)
    adjoined_loss = functools.partial(anfast.AdjoinedLoss(), lambda_=1.0)
    return {
        "base": (base, F.cross_entropy),
        "anfast": (adjoined[None], adjoined_loss),
        "anfast_torch": (adjoined["torch"], adjoined_loss),
        "anfast_aten": (aten_adjoined(adjoined["aten"]), adjoined_loss),
        "anfast_streams": (anfast.use_streams(adjoined["streams"], 2), adjoined_loss),
        "masked": (masked, adjoined_loss),
        "dan": search_provider(base, input_size, device),
    }


def build_step(model: nn.Module, loss_fn, mode: str, compile_as, images: torch.Tensor,
               labels: torch.Tensor, *, scaler, batch_size: int, image_size: int, num_classes: int,
               channels_last: bool, amp_dtype, memory_format):
    """One provider's training step in one --compile mode, as a call without arguments:
    eager ("off"), torch.compile'd (``compile_as``), or captured as a CUDA graph (GRAPHS)."""
    device = images.device
    model.to(device=device, memory_format=memory_format).train()
    weights, more_optimizers = model, ()
    if isinstance(model, GatedNetwork):  # as a search trains: the logits by their own Adam
        weights = model.network
        more_optimizers = (torch.optim.Adam(model.gates.parameters(), lr=SearchConfig.arch_lr, fused=True),)
    optimizer = torch.optim.SGD(weights.parameters(), lr=1e-3, momentum=0.9, fused=True)
    forward = model
    if compile_as is not None or mode == GRAPHS:
        warm_up(model, loss_fn, batch_size=batch_size, image_size=image_size,
                num_classes=num_classes, channels_last=channels_last,
                amp_dtype=amp_dtype, device=device)
    if compile_as is not None:
        forward = torch.compile(model, mode=compile_as)
    meter = StepMeter(device, max_bad_steps=0, step=0)
    step = functools.partial(
        train_step, forward, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler,
        parameters=list(weights.parameters()), amp_dtype=amp_dtype, meter=meter,
        more_optimizers=more_optimizers)
    if mode == GRAPHS:
        tensor_learning_rates(optimizer, device)
        step = CapturedStep(step, images, labels,
                            state=functools.partial(step_state_tensors, model, optimizer, meter))
    return functools.partial(step, images, labels)


def warmed_up(step, steps: int, device: torch.device):
    """``step`` after ``steps`` untimed runs of it (compiles, tunes, fills caches)."""
    seconds_per_step(step, steps, device)
    return step


def guarded(key: str, errors: dict, work):
    """``work()``, or None with ``errors[key]`` set to what it raised (an out-of-memory, a
    failed compile or capture): one key's failure leaves the others measured."""
    try:
        return work()
    except Exception as error:  # noqa: BLE001 -- any failure is the result for this key
        errors[key] = f"{type(error).__name__}: {error}"[:600]
        print(f"{key} failed and is left out: {errors[key]}", flush=True)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # what the failed key held, for the keys after it
        return None


def seconds_per_step(step, steps: int, device: torch.device) -> float:
    """Run ``steps`` steps back to back and wait for the device once, as training does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50",
                        help="a torchvision model, or timm:NAME for a timm one (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--image-size", type=int, default=None, help="default: 64 CPU, 224 CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 CPU, 64 CUDA")
    parser.add_argument("--num-classes", type=int, default=DEFAULT_SYNTHETIC_CLASSES)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC activations (default: on CUDA only)")
    parser.add_argument("--compile", default="off",
                        help=f"comma list of off, torch.compile modes {list(COMPILE_CHOICES)} and "
                             f"{GRAPHS} (CUDA graphs of the eager step); each mode times every "
                             f"provider again (default: off)")
    parser.add_argument("--providers", default=None,
                        help=f"comma list of {', '.join(PROVIDERS)} (default: all; on the CPU all "
                             f"but anfast_streams, which is anfast there); the ratios that need a "
                             f"provider left out are not computed")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per provider per round")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON (default: benchmarks/results/)")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    modes = [mode.strip() for mode in args.compile.split(",") if mode.strip()]
    unknown = sorted(set(modes) - {"off", GRAPHS, *COMPILE_CHOICES})
    if unknown or not modes:
        parser.error(f"--compile {args.compile}: use a comma list of off, {GRAPHS}, "
                     f"{', '.join(COMPILE_CHOICES)}")
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds {args.rounds} --steps {args.steps}: both must be at least 1")
    if GRAPHS in modes and not on_cuda:
        parser.error(f"--compile {GRAPHS} captures CUDA graphs; it needs --device cuda")
    default_providers = PROVIDERS if on_cuda else tuple(p for p in PROVIDERS if p != "anfast_streams")
    chosen = [name.strip() for name in (args.providers or ",".join(default_providers)).split(",")
              if name.strip()]
    if not chosen or set(chosen) - set(PROVIDERS):
        parser.error(f"--providers {args.providers}: use a comma list of {', '.join(PROVIDERS)}")
    image_size = args.image_size or (224 if on_cuda else 64)
    batch_size = args.batch_size or (64 if on_cuda else 8)
    amp_dtype = torch.bfloat16 if on_cuda else None
    channels_last = on_cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    providers = build_providers(base_model(args.arch, args.num_classes), args.alpha, args.num_classes,
                                (3, image_size, image_size), device=device)
    providers = {name: providers[name] for name in chosen}
    images, labels = synthetic_batch(batch_size, image_size, args.num_classes, device=device,
                                     channels_last=channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if on_cuda and "anfast" in providers:
        # As `anfast train` does before its first step: auto's decisions (from the cache
        # `anfast tune` filled, else measured now), and the convs decided for torch pinned
        # to it, so they compile as aten convolutions.
        model = providers["anfast"][0].to(device=device, memory_format=memory_format)
        prepare_backends(model, "auto", batch_size, image_size, amp_dtype)
    # Each key's step is built when its warm-up comes, eager first, compiled next, CUDA
    # graphs last (their memory pools stay held for the rest of the run): a compile or a
    # capture that fails (out of memory, a capture error) is recorded under "errors" and
    # the other keys go on.
    builders = {}
    for mode in sorted(modes, key=lambda m: (m != "off", m == GRAPHS)):
        compile_as, fallback = resolve_compile(None if mode in ("off", GRAPHS) else mode, device)
        if fallback:
            print(fallback, flush=True)
        for name, (model, loss_fn) in providers.items():
            if mode != "off" and name == "anfast_streams":
                continue  # streams run eager kernels on several streams: not captured, not compiled
            if mode == GRAPHS and name == "dan":
                continue  # a search's temperature and warm-up change between steps: not captured
            key = name if mode == "off" else f"{name}+{mode}"
            builders[key] = functools.partial(
                build_step, model, loss_fn, mode, compile_as, images, labels, scaler=scaler,
                batch_size=batch_size, image_size=image_size, num_classes=args.num_classes,
                channels_last=channels_last, amp_dtype=amp_dtype, memory_format=memory_format)

    out = None if args.out is None else args.out / "train_throughput.json"
    # What every write of the JSON shares, the environment (commit, versions) read once.
    common = {**environment(device), "arch": args.arch, "alpha": args.alpha, "policy": "paper",
              "providers_run": chosen, "image_size": image_size, "batch_size": batch_size, "num_classes": args.num_classes,
              "data": "synthetic", "precision": "bf16" if amp_dtype else "fp32",
              "channels_last": channels_last, "compile": modes, "warmup_steps": args.warmup,
              "rounds": args.rounds, "steps_per_round": args.steps}
    load_before = os.getloadavg()
    times, warmup_s, errors, memory_gib = {}, {}, {}, {}

    # The JSON is rewritten after each key's warm-up and after every round, so a run that
    # a time limit ends (a GPU lease) keeps what it measured; "rounds_done" says how far it got.
    def save() -> tuple[dict, Path]:
        result = summarize(times, warmup_s, list(providers), common, load_before, errors)
        result["peak_memory_gib"] = memory_gib
        return result, write_result("train_throughput", result, out)

    steps = {}
    for key, build in builders.items():  # builds, compiles, tunes and captures
        start = time.perf_counter()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = guarded(key, errors, lambda: warmed_up(build(), args.warmup, device))
        if step is not None:
            steps[key], times[key] = step, []
            warmup_s[key] = time.perf_counter() - start
            print(f"warm-up of {key}: {warmup_s[key]:.1f} s", flush=True)
        if on_cuda:  # the peak during the key's warm-up (what earlier keys hold included), and
            # what the run holds after it (CUDA graphs' pools)
            memory_gib[key] = {"peak_allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                               "reserved_after": torch.cuda.memory_reserved(device) / 2**30}
        result, path = save()

    for round_index in range(args.rounds):
        for key, step in list(steps.items()):
            seconds = guarded(key, errors, lambda: seconds_per_step(step, args.steps, device))
            if seconds is None:
                del steps[key]
            else:
                times[key].append(seconds)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{key} {batch_size / statistics.median(t):.1f} img/s" for key, t in times.items() if t),
            flush=True)
        result, path = save()
    print(json.dumps({"ratios": result["ratios"],
                      **{k: v["images_per_second"] for k, v in result["providers"].items()}}, indent=2))
    print(f"wrote {path}")


def summarize(times: dict, warmup_s: dict, providers: list, common: dict, load_before,
              errors: dict) -> dict:
    """The result JSON of the rounds in ``times`` ({key: [seconds per step, one per round]}):
    each provider's median img/s, the ratios of RATIOS and compiled / eager per mode;
    ``common`` holds the environment and the run's options (batch size, compile modes);
    ``errors`` the keys left out ({key: what it raised}), whose rounds before the error
    are reported but do not hold "rounds_done" back."""
    batch_size, modes = common["batch_size"], common["compile"]
    rows = {}
    for key, round_times in times.items():
        if not round_times:
            continue
        median = statistics.median(round_times)
        rows[key] = {"images_per_second": batch_size / median, "median_step_s": median,
                     "min_step_s": min(round_times), "max_step_s": max(round_times),
                     "rounds": len(round_times), "steps_per_round": common["steps_per_round"]}
    ratios = {}
    for mode in modes:
        suffix = "" if mode == "off" else f"+{mode}"
        speed = {name: rows[name + suffix]["images_per_second"] for name in providers
                 if name + suffix in rows}
        for numerator, denominator in RATIOS:
            if numerator in speed and denominator in speed:
                ratios[f"{numerator}_over_{denominator}{suffix}"] = speed[numerator] / speed[denominator]
        if "off" in modes and mode != "off":  # each provider compiled vs eager, where both ran
            for name in speed:
                if name in rows:
                    ratios[f"{name}{suffix}_over_{name}"] = speed[name] / rows[name]["images_per_second"]
    return {
        "benchmark": "train_throughput",
        "question": "AN training img/s: anfast (student at real width; auto and torch backends, "
                    "pure aten convs, student streams) vs the authors' masked full-width student "
                    "vs plain base training, eager, compiled and as whole-step CUDA graphs; "
                    "and a DAN search step (dan) against them",
        **common,
        "rounds_done": min((len(t) for key, t in times.items() if key not in errors), default=0),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "anfast_backend": os.environ.get("ANFAST_BACKEND", "auto"), "warmup_s": warmup_s,
        "providers": rows, "ratios": ratios, "errors": errors, "anfast_version": anfast.__version__,
    }


if __name__ == "__main__":
    main()
