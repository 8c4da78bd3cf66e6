"""``search(SearchConfig)``: DAN width search toward a FLOPs or parameter target.

Each step draws Gumbel-softmax gates, masks the full-width student with them, and
minimises

    L = CE(y, z_base) + lambda * (KL(base || student) + gamma * R),
    R = E_{a ~ softmax(theta)}[(cost(a) / (target * cost_base) - 1)^2]

over the network weights (AdamW, as the trainer's quickstart) and the architecture logits (Adam, their own
optimizer; they start after ``arch_warmup`` of the steps). R is the exact expected
penalty of an architecture drawn from the noise-free choice probabilities (see
anfast.dan.cost): its variance part makes every group commit to one choice, so the
argmax student lands on the target, not only the average one. The derived student
(argmax per group) is written to RUN_DIR/arch.json with its exact params and FLOPs,
next to widths.png and metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from anfast.adjoin import adjoin
from anfast.dan.cost import CostModel
from anfast.dan.derive import derive, plot_widths, write_arch
from anfast.dan.gates import ChoiceGates, StudentMasks, entropy, temperature
from anfast.dan.space import DEFAULT_CHOICES, DanError, SearchSpace, _check_choices
from anfast.train.build import check_arch
from anfast.train.config import check_field_types
from anfast.runs.distributed import resolve_device
from anfast.loss import AdjoinedLoss, get_lambda_schedule
from anfast.runs.pretrained import load_pretrained
from anfast.runs.records import MetricsLog
from anfast.runs.rundir import SEARCH_ARTIFACTS, RunDirLock, claim_run_dir
from anfast.runs.schedule import lr_at

__all__ = ["SearchConfig", "SearchResult", "search", "TAU_SCHEDULES"]

TAU_SCHEDULES = ("auto", "paper", "anneal")
OPTIMIZERS = ("adamw", "sgd")
# tau0 = 15 needs this many epochs at x0.956 to fall near 1 (15 * 0.956^50 = 1.6).
PAPER_SCHEDULE_EPOCHS = 50


@dataclass
class SearchConfig:
    """One DAN search. Set exactly one of ``target_flops`` / ``target_params``.

    Temperature: ``tau_schedule="paper"`` is tau0 * tau_decay^epoch (paper: tau0 = 15,
    made for ~100-epoch searches); ``"anneal"`` goes geometrically, step by step, from
    tau0 to tau_end over the whole search, so the gates are nearly one-hot by the end
    of even a short search; ``"auto"`` (default) is "paper" from 50 epochs up, else
    "anneal". ``tau0=None`` is 15 for "paper" and 1 for "anneal".
    """

    data: Optional[str] = None             # ImageNet-layout root; None: the built-in set
    arch: str = "resnet18"                 # torchvision name, xresnet50, timm:NAME (anfast.models)
    target_flops: Optional[float] = None   # fraction of the base's FLOPs, e.g. 0.4
    target_params: Optional[float] = None  # fraction of the base's parameters, e.g. 0.25
    choices: Tuple[float, ...] = DEFAULT_CHOICES
    round_to: int = 8
    gamma: float = 10.0                    # weight of the resource penalty R
    lambda_schedule: str = "constant"      # a short search needs the KL and R from step 0
    tau_schedule: str = "auto"             # "auto" | "paper" | "anneal"
    tau0: Optional[float] = None           # None: 15 ("paper") or 1 ("anneal")
    tau_decay: float = 0.956               # per epoch, "paper"
    tau_end: float = 0.2                   # last step's temperature, "anneal"
    frozen_noise: bool = False             # the paper's single noise draw
    epochs: int = 5
    max_steps_per_epoch: Optional[int] = None
    batch_size: int = 64
    image_size: int = 32
    optimizer: str = "adamw"               # network weights: "adamw" | "sgd", cosine schedule
    lr: float = 2e-3                       # the trainer's quickstart AdamW settings
    momentum: float = 0.9                  # sgd only
    weight_decay: float = 0.05
    arch_lr: float = 0.1                   # architecture logits, Adam
    arch_weight_decay: float = 0.0
    arch_warmup: float = 0.2               # fraction of the steps that train only the weights
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    out: str = "runs/search"
    overwrite: bool = False                # replace a search already in `out`
    pretrained: Optional[str] = None       # local checkpoint for the base (anfast.runs.pretrained)
    pretrained_skip_classifier: bool = False

    @property
    def target(self) -> dict[str, float]:
        """{"flops": f} or {"params": p}."""
        return {"flops": self.target_flops} if self.target_flops is not None else {"params": self.target_params}

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
        for name in ("epochs", "batch_size", "image_size", "round_to"):
            if getattr(self, name) < 1:
                raise DanError(f"{name}={getattr(self, name)} must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise DanError(f"optimizer={self.optimizer!r}: choose one of {OPTIMIZERS}")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise DanError(f"tau_schedule={self.tau_schedule!r}: choose one of {TAU_SCHEDULES}")
        for name in ("tau_end", "lr", "arch_lr") + (("tau0",) if self.tau0 is not None else ()):
            if getattr(self, name) <= 0:
                raise DanError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.tau_decay <= 1:
            raise DanError(f"tau_decay={self.tau_decay} must be in (0, 1]")
        if not 0 <= self.arch_warmup < 1:
            raise DanError(f"arch_warmup={self.arch_warmup} must be in [0, 1): the fraction of the "
                           "steps before the architecture logits start to move")
        if self.gamma < 0:
            raise DanError(f"gamma={self.gamma} must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise DanError(f"max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 (or unset)")
        get_lambda_schedule(self.lambda_schedule)
        return self

    def resolved_tau_schedule(self) -> str:
        """"paper" or "anneal": what "auto" means for this many epochs."""
        if self.tau_schedule != "auto":
            return self.tau_schedule
        return "paper" if self.epochs >= PAPER_SCHEDULE_EPOCHS else "anneal"

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
           train_loader: Optional[Iterable] = None, num_classes: Optional[int] = None) -> SearchResult:
    """Search one width per group toward ``config.target``, derive the student, write RUN_DIR.

    By default the data is ``config.data`` (or the built-in dataset) and the model the
    ``config.arch`` (anfast.models.create_model). Tests and notebooks may pass ``model`` (an
    nn.Module with ``num_classes`` outputs) and ``train_loader`` (any iterable of
    (images, labels) batches; give ``num_classes`` when it has no ``classes``).
    RUN_DIR is locked for the search's life and a previous search in it is refused
    unless ``config.overwrite`` (see anfast.runs.rundir).
    """
    config.validate()
    lock = claim_run_dir(Path(config.out), SEARCH_ARTIFACTS, resume=None, overwrite=config.overwrite)
    try:
        return _search(config, model, train_loader, num_classes, lock)
    finally:
        lock.release()


def _search(config: SearchConfig, model: Optional[nn.Module], train_loader: Optional[Iterable],
            num_classes: Optional[int], lock: RunDirLock) -> SearchResult:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if model is None:
        check_arch(config.arch)  # before the loader, which may scan every image first
    if train_loader is None:
        train_loader = _create_train_loader(config, device)
    if model is None:
        classes = num_classes or len(train_loader.classes)
        source: Union[nn.Module, str] = config.arch
        model_kwargs = {"num_classes": classes}
    else:
        source, model_kwargs = model, {}
    input_size = (3, config.image_size, config.image_size)
    network = adjoin(source, alpha=1, policy="all", round_to=config.round_to, input_size=input_size,
                     **model_kwargs).to(device)
    if config.pretrained is not None:
        load_pretrained(network, config.pretrained, config.pretrained_skip_classifier)
    space = SearchSpace.from_network(network, config.choices, config.round_to)
    cost_model = CostModel(network, space, input_size)
    (target_kind, target_value), = config.target.items()
    gates = ChoiceGates(space, config.frozen_noise, torch.Generator().manual_seed(config.seed)).to(device)
    masks = StudentMasks(network, space)

    if config.optimizer == "sgd":
        weight_optimizer = torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum,
                                           weight_decay=config.weight_decay)
    else:
        weight_optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    arch_optimizer = torch.optim.Adam(gates.parameters(), lr=config.arch_lr, weight_decay=config.arch_weight_decay)
    loss_fn = AdjoinedLoss()
    lambda_at = get_lambda_schedule(config.lambda_schedule)
    steps_per_epoch = _steps_per_epoch(train_loader, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs

    run_dir = Path(config.out)
    lock.remove_previous_run()  # --overwrite: set-up passed, the old search may go now
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "search_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    log = MetricsLog(run_dir, [])
    arch_start = int(config.arch_warmup * total_steps)
    step = 0
    network.train()
    try:
        for epoch in range(config.epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "penalty": 0.0, "expected": 0.0, "gate_entropy": 0.0,
                    "tau": 0.0}
            started = time.perf_counter()
            batches = tqdm(_take(train_loader, steps_per_epoch), total=steps_per_epoch, leave=False,
                           desc=f"search epoch {epoch + 1}/{config.epochs}")
            for images, labels in batches:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                for group in weight_optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps=total_steps, warmup_steps=0, base_lr=config.lr)
                tau = config.tau_at(step, steps_per_epoch, total_steps)
                weights = gates(tau)
                masks.set_gates(weights)
                terms = loss_fn.terms(network(images), labels)
                resource = cost_model.expected_penalty(gates.probabilities(), target_kind, target_value)
                lambda_ = lambda_at(step / total_steps)
                loss = terms["ce"] + lambda_ * (terms["kl"] + config.gamma * resource["penalty"].float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"search loss is {loss.item()} at step {step}; lower --lr or --arch-lr")
                weight_optimizer.zero_grad(set_to_none=True)
                arch_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                weight_optimizer.step()
                if step >= arch_start:
                    arch_optimizer.step()
                step += 1
                for name, value in (("loss", loss), ("ce", terms["ce"]), ("kl", terms["kl"]),
                                    ("penalty", resource["penalty"]), ("expected", resource["mean"]),
                                    ("gate_entropy", entropy(weights.detach()))):
                    sums[name] += float(value.detach())
                sums["tau"] += tau
                batches.set_postfix(loss=f"{loss.item():.3f}", cost=f"{resource['mean'].item():.3f}")
            derived = cost_model.fraction(cost_model.exact(gates.argmax()))
            seen = max(1, steps_per_epoch)
            log.log({
                "epoch": epoch + 1, "step": step, "lambda": lambda_at(step / total_steps),
                **{k: v / seen for k, v in sums.items() if k != "expected"},
                f"expected_{target_kind}": sums["expected"] / seen,
                "choice_entropy": float(entropy(gates.probabilities().detach())),
                "derived_flops": float(derived["flops"]), "derived_params": float(derived["params"]),
                "seconds": time.perf_counter() - started,
            })
    finally:
        masks.remove()
        log.close()

    choice = gates.argmax()
    arch = derive(source, space.alphas(choice.cpu()), image_size=config.image_size, round_to=config.round_to,
                  target=config.target, choices=config.choices, **model_kwargs)
    arch_path = write_arch(arch, run_dir / "arch.json")
    plot_path = plot_widths(arch, run_dir / "widths.png")
    return SearchResult(arch, run_dir, arch_path, plot_path, gates.theta.detach().cpu(), log.history)


def _create_train_loader(config: SearchConfig, device: torch.device):
    from anfast.data import builtin_dataset, create_loader

    root = config.data if config.data is not None else builtin_dataset()
    return create_loader(root, "train", batch_size=config.batch_size, image_size=config.image_size,
                         loader="auto", workers=config.workers, device=device, seed=config.seed)


def _steps_per_epoch(loader: Iterable, limit: Optional[int]) -> int:
    try:
        steps = len(loader)
    except TypeError:
        if limit is None:
            raise DanError("the train loader has no len(); set max_steps_per_epoch") from None
        return limit
    if steps == 0:
        raise DanError("the train loader yields no batches; use a smaller --batch-size or more data")
    return min(steps, limit) if limit is not None else steps


def _take(loader: Iterable, steps: int):
    for step, batch in enumerate(loader):
        if step >= steps:
            return
        yield batch
