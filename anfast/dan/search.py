"""``search(SearchConfig)``: DAN width search toward a FLOPs or parameter target.

Each step draws Gumbel-softmax gates, masks the full-width student with them, and
minimises

    L = CE(y, z_base) + lambda * (KL(base || student) + gamma * R),
    R = E_{a ~ softmax(theta)}[(cost(a) / (target * cost_base) - 1)^2]

over the network weights (the run's optimizer, as `anfast train`'s) and the architecture
logits (Adam, their own optimizer; they start after ``arch_warmup`` of the steps). R is
the exact expected penalty of an architecture drawn from the noise-free choice
probabilities (see anfast.dan.cost): its variance part makes every group commit to one
choice, so the argmax student lands on the target, not only the average one. The
derived student (argmax per group) is written to RUN_DIR/arch.json with its exact
params and FLOPs, next to widths.png and metrics.jsonl.

A search is a kind of run of anfast.train.fit (``Search``): the same sync-free step,
AMP, channels_last, --compile, torchrun / DDP, --resume, run directory, lock and
records as `anfast train`. What it adds: the gated network (``GatedNetwork``: the
weights and the logits in one module, so DDP all-reduces the logits' gradient with the
weights' and every rank keeps the same architecture), the cost penalty in the loss
(``SearchLoss``), the logits' optimizer and its warm-up, and arch.json at the end.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from anfast.adjoin import AdjoinedOutput, adjoin
from anfast.dan.cost import CostModel
from anfast.dan.derive import derive, plot_widths, write_arch
from anfast.dan.gates import ChoiceGates, StudentMasks, entropy, temperature
from anfast.dan.space import DEFAULT_CHOICES, DanError, SearchSpace, _check_choices
from anfast.data import create_loader
from anfast.loss import AdjoinedLoss, get_lambda_schedule
from anfast.runs.checkpoint import write_text_atomically
from anfast.runs.distributed import DistributedInfo, barrier
from anfast.runs.errors import ConfigError
from anfast.runs.rundir import SEARCH_ARTIFACTS
from anfast.train.build import check_arch, create_optimizer
from anfast.train.config import TrainConfig, check_field_types
from anfast.train.loop import (Data, Parts, Run, Schedule, Training, check_resumed_data, data_root, fit,
                               loader_options, prepare_network)
from anfast.train.state import RunState

__all__ = ["SearchConfig", "SearchResult", "search", "search_training", "GatedNetwork", "SearchLoss",
           "Search", "TAU_SCHEDULES", "SEARCH_TRAINING_DEFAULTS"]

TAU_SCHEDULES = ("auto", "paper", "anneal")
# tau0 = 15 needs this many epochs at x0.956 to fall near 1 (15 * 0.956^50 = 1.6).
PAPER_SCHEDULE_EPOCHS = 50
# Where a search's training options differ from `anfast train`'s defaults: a short
# search needs the KL and R from step 0 (constant lambda) and no LR warm-up.
SEARCH_TRAINING_DEFAULTS = dict(epochs=5, lambda_schedule="constant", warmup_epochs=0.0, out="runs/search")
# TrainConfig options a search cannot take: it trains one full-width student of its own.
_REFUSED_TRAINING = (
    ("alpha", (4.0,), "the search's student is full width, masked by its gates"),
    ("policy", "paper", "every width group can shrink in a search"),
    ("arch_config", None, "the search writes an arch config; it does not train one"),
    ("objective", "adjoined", "the search's loss is the adjoined one plus the cost penalty"),
    ("teacher", None, "the search distils the student from its own base"),
    ("ema", False, "the search's result is its architecture, not averaged weights"),
    ("streams", 1, "the gates' masks run on the default stream"),
    ("cuda_graphs", False, "the temperature and the logits' warm-up change between steps"),
)


def search_training(**options) -> TrainConfig:
    """The TrainConfig of a search: SEARCH_TRAINING_DEFAULTS, then ``options``."""
    return TrainConfig(**{**SEARCH_TRAINING_DEFAULTS, **options})


@dataclass
class SearchConfig:
    """One DAN search: its own options here, how it trains (data, model, epochs, optimizer,
    AMP, compile, out, resume, ...) in ``train``. Set exactly one of ``target_flops`` /
    ``target_params``.

    Temperature: ``tau_schedule="paper"`` is tau0 * tau_decay^epoch (paper: tau0 = 15,
    made for ~100-epoch searches); ``"anneal"`` goes geometrically, step by step, from
    tau0 to tau_end over the whole search, so the gates are nearly one-hot by the end
    of even a short search; ``"auto"`` (default) is "paper" from 50 epochs up, else
    "anneal". ``tau0=None`` is 15 for "paper" and 1 for "anneal".
    """

    target_flops: Optional[float] = None   # fraction of the base's FLOPs, e.g. 0.4
    target_params: Optional[float] = None  # fraction of the base's parameters, e.g. 0.25
    choices: Tuple[float, ...] = DEFAULT_CHOICES
    gamma: float = 10.0                    # weight of the resource penalty R
    tau_schedule: str = "auto"             # "auto" | "paper" | "anneal"
    tau0: Optional[float] = None           # None: 15 ("paper") or 1 ("anneal")
    tau_decay: float = 0.956               # per epoch, "paper"
    tau_end: float = 0.2                   # last step's temperature, "anneal"
    frozen_noise: bool = False             # the paper's single noise draw
    arch_lr: float = 0.1                   # architecture logits, Adam
    arch_weight_decay: float = 0.0
    arch_warmup: float = 0.2               # fraction of the steps that train only the weights
    max_steps_per_epoch: Optional[int] = None
    train: TrainConfig = field(default_factory=search_training)

    @property
    def target(self) -> dict[str, float]:
        """{"flops": f} or {"params": p}."""
        return {"flops": self.target_flops} if self.target_flops is not None else {"params": self.target_params}

    def search_options(self) -> Dict[str, Any]:
        """The search's own options (all but ``train``) as plain values."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        options["choices"] = list(self.choices)
        return options

    def validate(self) -> "SearchConfig":
        """Check the options that need no data or model; returns self."""
        check_field_types(self, DanError)
        if (self.target_flops is None) == (self.target_params is None):
            raise DanError("give exactly one target: --target-flops 0.4 or --target-params 0.25 "
                           "(a fraction of the base network's count)")
        (kind, value), = self.target.items()
        self.choices = _check_choices(self.choices)
        if not 0 < value <= 1:
            raise DanError(f"target {kind}={value}: give a fraction of the base in (0, 1], e.g. 0.4")
        smallest = 1 / max(self.choices) ** 2
        if value < smallest:
            raise DanError(f"target {kind}={value} is below what choices {tuple(self.choices)} reach "
                           f"(about {smallest:.3f} of the base); add a larger alpha to --choices")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise DanError(f"tau_schedule={self.tau_schedule!r}: choose one of {TAU_SCHEDULES}")
        for name in ("tau_end", "arch_lr") + (("tau0",) if self.tau0 is not None else ()):
            if getattr(self, name) <= 0:
                raise DanError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.tau_decay <= 1:
            raise DanError(f"tau_decay={self.tau_decay} must be in (0, 1]")
        if not 0 <= self.arch_warmup < 1:
            raise DanError(f"arch_warmup={self.arch_warmup} must be in [0, 1): the fraction of the "
                           "steps before the architecture logits start to move")
        if self.gamma < 0:
            raise DanError(f"gamma={self.gamma} must be >= 0")
        if self.arch_weight_decay < 0:
            raise DanError(f"arch_weight_decay={self.arch_weight_decay} must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise DanError(f"max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 (or unset)")
        if not isinstance(self.train, TrainConfig):
            raise DanError(f"train={self.train!r} must be a TrainConfig (anfast.dan.search_training(...))")
        for name, default, why in _REFUSED_TRAINING:
            if getattr(self.train, name) != default:
                raise DanError(f"{name}={getattr(self.train, name)!r}: {why}; leave it out of a search")
        self.train.validate()
        return self

    def resolved_tau_schedule(self) -> str:
        """"paper" or "anneal": what "auto" means for this many epochs."""
        if self.tau_schedule != "auto":
            return self.tau_schedule
        return "paper" if self.train.epochs >= PAPER_SCHEDULE_EPOCHS else "anneal"

    def tau_at(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The Gumbel-softmax temperature at ``step``."""
        schedule = self.resolved_tau_schedule()
        if schedule == "paper":
            return temperature(step // steps_per_epoch, 15.0 if self.tau0 is None else self.tau0, self.tau_decay)
        start = 1.0 if self.tau0 is None else self.tau0
        return start * (self.tau_end / start) ** (step / max(1, total_steps - 1))


@dataclass
class SearchResult:
    """What a search produced: the arch record and where its files are."""

    arch: dict[str, Any]
    run_dir: Path
    arch_path: Path
    plot_path: Path
    logits: torch.Tensor  # (groups, choices) final architecture logits
    history: list[dict[str, Any]]


def search(config: SearchConfig, *, model: Optional[nn.Module] = None,
           train_loader: Optional[Iterable] = None, num_classes: Optional[int] = None,
           should_stop: Optional[Callable[[int], bool]] = None) -> Union[SearchResult, Dict[str, Any]]:
    """Search one width per group toward ``config.target``, derive the student, write RUN_DIR.

    By default the data is ``config.train.data`` (or the built-in dataset) and the model
    ``config.train.arch``. Tests and notebooks may pass ``model`` (an nn.Module with
    ``num_classes`` outputs) and ``train_loader`` (any iterable of (images, labels)
    batches with a len(), or without one under ``max_steps_per_epoch``; give
    ``num_classes`` when it has no ``classes``). Runs on anfast.train.fit: the run
    directory is locked, a previous run in it is refused unless ``train.overwrite`` or
    ``train.resume``, and a stop (SIGTERM, ``should_stop(step)``) saves a checkpoint and
    returns fit's ``{"interrupted": True, ...}``; resume with ``train.resume = "auto"``.
    """
    config.validate()
    kind = Search(config, model=model, train_loader=train_loader, num_classes=num_classes)
    return fit(config.train, should_stop=should_stop, kind=kind)


class GatedOutput(NamedTuple):
    """The adjoined output of the masked network, the gate weights that masked it, the
    choice probabilities the penalty reads, and the step's temperature."""

    network: AdjoinedOutput
    gate_weights: torch.Tensor
    probabilities: torch.Tensor
    tau: torch.Tensor


class GatedNetwork(nn.Module):
    """What the search's steps train: the full-width adjoined network with its student
    masked by Gumbel-softmax gates (anfast.dan.gates). Weights and logits are one module,
    so DDP all-reduces the logits' gradient with the weights'.

    ``tau`` is a device buffer, set in place each step (a compiled graph reads it, never
    a Python number baked in); ``learn_logits`` False (the warm-up) gives the logits no
    gradient.
    """

    def __init__(self, network: nn.Module, space: SearchSpace, gates: ChoiceGates) -> None:
        super().__init__()
        self.network = network
        self.gates = gates
        self.masks = StudentMasks(network, space)
        self.register_buffer("tau", torch.ones((), device=gates.theta.device))
        self.learn_logits = True

    def forward(self, images: torch.Tensor) -> GatedOutput:
        weights = self.gates(self.tau, learn=self.learn_logits)
        self.masks.set_gates(weights)
        return GatedOutput(self.network(images), weights, self.gates.probabilities(learn=self.learn_logits),
                           self.tau)


class SearchLoss(nn.Module):
    """CE(y, z_base) + lambda * (KL(base || student) + gamma * R) of a GatedOutput.

    Keeps the epoch's sums of its terms on the device (``sums``, read once per epoch by
    ``epoch_means``), so a step reads nothing on the host.
    """

    TERMS = ("ce", "kl", "penalty", "expected", "gate_entropy", "tau", "forwards")

    def __init__(self, cost_model: CostModel, target: Dict[str, float], gamma: float,
                 device: torch.device) -> None:
        super().__init__()
        self.adjoined = AdjoinedLoss()
        self.cost_model = cost_model
        (self.target_kind, self.target_value), = target.items()
        self.gamma = gamma
        self.sums = torch.zeros(len(self.TERMS), dtype=torch.float64, device=device)

    def forward(self, output: GatedOutput, target: torch.Tensor, lambda_: float) -> torch.Tensor:
        terms = self.adjoined.terms(output.network, target)
        resource = self.cost_model.expected_penalty(output.probabilities, self.target_kind, self.target_value)
        loss = terms["ce"] + lambda_ * (terms["kl"] + self.gamma * resource["penalty"].float())
        with torch.no_grad():
            values = (terms["ce"], terms["kl"], resource["penalty"], resource["mean"],
                      entropy(output.gate_weights), output.tau, torch.ones_like(output.tau))
            self.sums += torch.stack([value.double() for value in values])
        return loss

    def epoch_means(self) -> Dict[str, float]:
        """The terms' means over the epoch's forward passes (the one host read)."""
        *sums, forwards = self.sums.tolist()
        return {name: value / max(1.0, forwards) for name, value in zip(self.TERMS, sums)}


class SearchBatches:
    """The search's training batches: a loader, or any iterable of (images, labels),
    cut to ``max_steps`` per epoch, with what fit reads of a loader (``classes``,
    ``set_epoch``, ``len``, and ``reason`` for the set-up line)."""

    def __init__(self, batches: Iterable, classes: Sequence, max_steps: Optional[int]) -> None:
        self.batches = batches
        self.classes = list(classes)
        try:
            self.length = len(batches) if max_steps is None else min(len(batches), max_steps)
        except TypeError:
            if max_steps is None:
                raise DanError("the train loader has no len(); set max_steps_per_epoch") from None
            self.length = max_steps
        if self.length == 0:
            raise DanError("the train loader yields no batches; use a smaller --batch-size or more data")
        self.reason = getattr(batches, "reason", "batches given to anfast.dan.search")

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for step, batch in enumerate(self.batches):
            if step >= self.length:
                return
            yield batch


class Search(Training):
    """What a DAN search adds to fit's engine (see the module docstring)."""

    command = "anfast search"
    artifacts = SEARCH_ARTIFACTS
    # `anfast search` takes its options from the command line alone (no merge with the run's).
    keep_options = "give the run's values (anfast search does not take them from the run)"

    def check_resumed(self, checkpoint: Dict[str, Any], resume_path: Path) -> None:
        if checkpoint.get("search_config") is None:
            raise ConfigError(f"--resume {resume_path}: not a checkpoint of `anfast search` (no search "
                              f"options in it); resume it with `anfast train`")

    def __init__(self, config: SearchConfig, *, model: Optional[nn.Module] = None,
                 train_loader: Optional[Iterable] = None, num_classes: Optional[int] = None) -> None:
        self.config = config
        self.model = model
        self.given_loader = train_loader
        self.num_classes = num_classes
        # Without a warm-up the logits are used at every step; with one, DDP must allow
        # a parameter that gets no gradient (the logits, until the warm-up ends).
        self.find_unused_parameters = config.arch_warmup > 0

    def open_data(self, config: TrainConfig, info: DistributedInfo, checkpoint, resume_path) -> Data:
        if self.given_loader is not None:
            loader, root = self.given_loader, "the batches given to anfast.dan.search"
        else:
            if self.model is None:
                check_arch(config.arch)  # before the loader, which may scan every image first
            root = data_root(config, info)
            loader = create_loader(root, "train", **loader_options(config, info))
        classes = range(self.num_classes) if self.num_classes is not None else getattr(loader, "classes", None)
        if classes is None:
            raise DanError("the train loader has no classes; pass num_classes")
        batches = SearchBatches(loader, classes, self.config.max_steps_per_epoch)
        if checkpoint is not None:
            check_resumed_data(checkpoint, resume_path, root, batches)
        return Data(batches, None, root)

    def build(self, config: TrainConfig, info: DistributedInfo, data: Data,
              amp_dtype: Optional[torch.dtype], *, pretrained: bool) -> Parts:
        device = info.device
        if self.model is None:
            self.source: Union[nn.Module, str] = config.arch
            self.model_kwargs = {"num_classes": len(data.train_loader.classes)}
        else:
            self.source, self.model_kwargs = self.model, {}
        input_size = (3, config.image_size, config.image_size)
        network = adjoin(self.source, alpha=1, policy="all", round_to=config.round_to, input_size=input_size,
                         **self.model_kwargs)
        self.space = SearchSpace.from_network(network, self.config.choices, config.round_to)
        # Counted on the CPU at batch 1, before the training batch's backends are set.
        self.cost_model = CostModel(network, self.space, input_size).to(device)
        network = prepare_network(network, config, info, amp_dtype, pretrained=pretrained)
        self.gates = ChoiceGates(self.space, self.config.frozen_noise,
                                 torch.Generator().manual_seed(config.seed)).to(device)
        self.gated = GatedNetwork(network, self.space, self.gates)
        # fused: the step's non-finite flag skips it on the device (anfast.train.step).
        self.arch_optimizer = torch.optim.Adam(self.gates.parameters(), lr=self.config.arch_lr,
                                               weight_decay=self.config.arch_weight_decay, fused=True)
        self.loss = SearchLoss(self.cost_model, self.config.target, self.config.gamma, device)
        return Parts(an=network, trained=self.gated, optimizer=create_optimizer(network, config, device),
                     scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), ema=None,
                     loss_fn=self.loss, lambda_schedule=get_lambda_schedule(config.lambda_schedule))

    def extra_state(self) -> Dict[str, Any]:
        return {"search_config": self.config.search_options(), "gates": self.gates.state_dict(),
                "arch_optimizer": self.arch_optimizer.state_dict(), "search_sums": self.loss.sums.clone()}

    def load_extra_state(self, checkpoint: Dict[str, Any], resume_path: Path) -> None:
        saved = checkpoint["search_config"]  # check_resumed refused a checkpoint without it
        current = self.config.search_options()
        changed = [f"--{name.replace('_', '-')} {current[name]} (the run: {saved.get(name)})"
                   for name in current if saved.get(name) != current[name]]
        if changed:
            raise ConfigError(f"--resume {resume_path} continues a search with the options it was "
                              f"started with, but {'; '.join(changed)}; {self.keep_options}, or "
                              f"start a new search in another --out")
        self.gates.load_state_dict(checkpoint["gates"])
        self.arch_optimizer.load_state_dict(checkpoint["arch_optimizer"])
        self.loss.sums.copy_(checkpoint["search_sums"])

    def write_config(self, config: TrainConfig, run_dir: Path) -> None:
        super().write_config(config, run_dir)
        options = {**self.config.search_options(), "train": config.to_dict()}
        write_text_atomically(run_dir / "search_config.json", json.dumps(options, indent=2) + "\n")

    def describe(self, config: TrainConfig, info: DistributedInfo, data: Data, schedule: Schedule) -> str:
        (kind, value), = self.config.target.items()
        model = config.arch if self.model is None else type(self.model).__name__
        return (f"{self.command}: {model}, target {kind} {value:g}, {len(self.space.groups)} width "
                f"groups x choices {','.join(f'{c:g}' for c in self.space.choices)}, "
                f"{len(data.train_loader.classes)} classes, {schedule.steps_per_epoch} steps/epoch, "
                f"device {info.device}, world size {info.world_size}, {data.train_loader.reason}")

    def start_epoch(self, state: RunState) -> None:
        if state.batches_done == 0:  # a run resumed mid-epoch keeps the checkpoint's sums
            self.loss.sums.zero_()

    def before_step(self, run: Run, step: int) -> Sequence[torch.optim.Optimizer]:
        schedule = run.schedule
        self.gated.tau.fill_(self.config.tau_at(step, schedule.steps_per_epoch, schedule.total_steps))
        self.gated.learn_logits = step >= int(self.config.arch_warmup * schedule.total_steps)
        return (self.arch_optimizer,) if self.gated.learn_logits else ()

    def epoch_row(self, run: Run, state: RunState, lambda_: float, epoch_start: float) -> Dict[str, Any]:
        means = self.loss.epoch_means()
        derived = self.cost_model.fraction(self.cost_model.exact(self.gates.argmax()))
        target_kind = self.loss.target_kind
        return {**self.training_row(run, state, lambda_, epoch_start),
                "ce": means["ce"], "kl": means["kl"], "penalty": means["penalty"],
                f"expected_{target_kind}": means["expected"], "gate_entropy": means["gate_entropy"],
                "tau": means["tau"], "choice_entropy": float(entropy(self.gates.probabilities().detach())),
                "derived_flops": float(derived["flops"]), "derived_params": float(derived["params"])}

    def epoch_message(self, config: TrainConfig, state: RunState, row: Dict[str, Any]) -> str:
        return (f"epoch {state.epoch}/{config.epochs}  loss {row['train_loss']:.4f}  penalty "
                f"{row['penalty']:.4f}  derived {self.loss.target_kind} "
                f"{row[f'derived_{self.loss.target_kind}']:.3f} of base  tau {row['tau']:.3f}  "
                f"{row['images_per_second']:.0f} img/s")

    def finish(self, run: Run, state: RunState) -> SearchResult:
        run_dir = run.run_dir
        choice = self.gates.argmax().cpu()
        arch = derive(self.source, self.space.alphas(choice), image_size=run.config.image_size,
                      round_to=run.config.round_to, target=self.config.target, choices=self.config.choices,
                      **self.model_kwargs)
        arch_path, plot_path = run_dir / "arch.json", run_dir / "widths.png"
        if run.info.is_main:
            run.log.close()
            write_arch(arch, arch_path)
            plot_widths(arch, plot_path)
            print(_report(arch, arch_path, plot_path, run.config.data), flush=True)
        barrier()
        return SearchResult(arch, run_dir, arch_path, plot_path, self.gates.theta.detach().cpu(), state.history)


# How far the derived student's cost may lie from the target (relative) before the report
# says that the search did not reach it.
TARGET_MISS = 0.1


def _report(arch: Dict[str, Any], arch_path: Path, plot_path: Path, data: Optional[str]) -> str:
    """The derived student's cost, where its files are, and the command that trains it; a
    note under the cost when it misses the target by more than TARGET_MISS."""
    fractions = {k: arch["student"][k] / arch["base"][k] for k in ("flops", "params")}
    missed = ""
    for kind, value in arch.get("target", {}).items():
        if abs(fractions[kind] - value) <= TARGET_MISS * value:
            continue
        # The penalty pulls toward the target from both sides: say which side it missed on.
        fix = ("the search did not reach it; search longer (--epochs) or weigh the cost more (--gamma)"
               if fractions[kind] > value else
               "it went below; weigh the cost less (--gamma) or give finer --choices")
        missed = (f"  note: the student's {kind} are {fractions[kind]:.1%} of the base's, the target "
                  f"{value:.1%}: {fix}\n")
    return (f"anfast search: derived student {arch['student']['flops']:,} FLOPs ({fractions['flops']:.1%} of "
            f"base), {arch['student']['params']:,} params ({fractions['params']:.1%}); target {arch['target']}\n"
            + missed +
            f"  arch: {arch_path}\n  plot: {plot_path}\n"
            f"  train it: anfast train --arch {arch['arch']} --image-size {arch['image_size']} "
            f"--round-to {arch['round_to']} --arch-config {arch_path}" + (f" --data {data}" if data else ""))
