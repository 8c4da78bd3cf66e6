"""``search(SearchConfig)``: DAN width search toward a FLOPs or parameter target.

Each step draws Gumbel-softmax gates, masks the full-width student with them, and
minimises

    L = CE(y, z_base) + lambda * (KL(base || student) + gamma * R),
    R = (E[cost] / (target * cost_base) - 1)^2

over the network weights (SGD) and the architecture logits (Adam, their own
optimizer). The derived student (argmax per group) is written to RUN_DIR/arch.json
with its exact params and FLOPs, next to widths.png and metrics.jsonl.
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
from anfast.dan.space import DEFAULT_CHOICES, DanError, SearchSpace
from anfast.train.loss import AdjoinedLoss, get_lambda_schedule
from anfast.train.records import MetricsLog
from anfast.train.schedule import lr_at

__all__ = ["SearchConfig", "SearchResult", "search"]


@dataclass
class SearchConfig:
    """One DAN search. Set exactly one of ``target_flops`` / ``target_params``.

    The temperature defaults are the paper's (tau0 = 15, x0.956 per epoch), tuned for
    ~100-epoch searches; a search of a few epochs needs a lower tau0 (1-2) so the
    gates can commit.
    """

    data: Optional[str] = None             # ImageNet-layout root; None: the built-in set
    arch: str = "resnet18"                 # torchvision.models.get_model name
    target_flops: Optional[float] = None   # fraction of the base's FLOPs, e.g. 0.4
    target_params: Optional[float] = None  # fraction of the base's parameters, e.g. 0.25
    choices: Tuple[float, ...] = DEFAULT_CHOICES
    round_to: int = 8
    gamma: float = 10.0                    # weight of the resource penalty R
    lambda_schedule: str = "constant"      # a short search needs the KL and R from step 0
    tau0: float = 15.0
    tau_decay: float = 0.956
    frozen_noise: bool = False             # the paper's single noise draw
    epochs: int = 5
    max_steps_per_epoch: Optional[int] = None
    batch_size: int = 64
    image_size: int = 32
    lr: float = 0.05                       # network weights, SGD, cosine
    momentum: float = 0.9
    weight_decay: float = 5e-4
    arch_lr: float = 0.03                  # architecture logits, Adam
    arch_weight_decay: float = 0.0
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    out: str = "runs/search"

    @property
    def target(self) -> dict[str, float]:
        """{"flops": f} or {"params": p}."""
        return {"flops": self.target_flops} if self.target_flops is not None else {"params": self.target_params}

    def validate(self) -> "SearchConfig":
        """Check the options that need no data or model; returns self."""
        if (self.target_flops is None) == (self.target_params is None):
            raise DanError("give exactly one target: --target-flops 0.4 or --target-params 0.25 "
                           "(a fraction of the base network's count)")
        (kind, value), = self.target.items()
        if not 0 < value <= 1:
            raise DanError(f"target {kind}={value}: give a fraction of the base in (0, 1], e.g. 0.4")
        smallest = 1 / max(self.choices) ** 2
        if value < smallest:
            raise DanError(f"target {kind}={value} is below what choices {tuple(self.choices)} reach "
                           f"(about {smallest:.3f} of the base); add a larger alpha to --choices")
        for name in ("epochs", "batch_size", "image_size", "round_to"):
            if getattr(self, name) < 1:
                raise DanError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("tau0", "lr", "arch_lr"):
            if getattr(self, name) <= 0:
                raise DanError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.tau_decay <= 1:
            raise DanError(f"tau_decay={self.tau_decay} must be in (0, 1]")
        if self.gamma < 0:
            raise DanError(f"gamma={self.gamma} must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise DanError(f"max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 (or unset)")
        get_lambda_schedule(self.lambda_schedule)
        return self


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
    torchvision ``config.arch``. Tests and notebooks may pass ``model`` (an
    nn.Module with ``num_classes`` outputs) and ``train_loader`` (any iterable of
    (images, labels) batches; give ``num_classes`` when it has no ``classes``).
    """
    config.validate()
    torch.manual_seed(config.seed)
    device = _resolve_device(config.device)
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
    space = SearchSpace.from_network(network, config.choices, config.round_to)
    cost_model = CostModel(network, space, input_size)
    (target_kind, target_value), = config.target.items()
    gates = ChoiceGates(space, config.frozen_noise, torch.Generator().manual_seed(config.seed)).to(device)
    masks = StudentMasks(network, space)

    weight_optimizer = torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)
    arch_optimizer = torch.optim.Adam(gates.parameters(), lr=config.arch_lr, weight_decay=config.arch_weight_decay)
    loss_fn = AdjoinedLoss()
    lambda_at = get_lambda_schedule(config.lambda_schedule)
    steps_per_epoch = _steps_per_epoch(train_loader, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs

    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "search_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    log = MetricsLog(run_dir, [])
    step = 0
    network.train()
    try:
        for epoch in range(config.epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            tau = temperature(epoch, config.tau0, config.tau_decay)
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "penalty": 0.0, "expected": 0.0, "gate_entropy": 0.0}
            started = time.perf_counter()
            batches = tqdm(_take(train_loader, steps_per_epoch), total=steps_per_epoch, leave=False,
                           desc=f"search epoch {epoch + 1}/{config.epochs}")
            for images, labels in batches:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                for group in weight_optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps=total_steps, warmup_steps=0, base_lr=config.lr)
                weights = gates(tau)
                masks.set_gates(weights)
                terms = loss_fn.terms(network(images), labels)
                expected = cost_model.expected(weights)[target_kind] / cost_model.base[target_kind]
                penalty = (expected / target_value - 1) ** 2
                lambda_ = lambda_at(step / total_steps)
                loss = terms["ce"] + lambda_ * (terms["kl"] + config.gamma * penalty.float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"search loss is {loss.item()} at step {step}; lower --lr or --arch-lr")
                weight_optimizer.zero_grad(set_to_none=True)
                arch_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                weight_optimizer.step()
                arch_optimizer.step()
                step += 1
                for name, value in (("loss", loss), ("ce", terms["ce"]), ("kl", terms["kl"]), ("penalty", penalty),
                                    ("expected", expected), ("gate_entropy", entropy(weights.detach()))):
                    sums[name] += float(value.detach())
                batches.set_postfix(loss=f"{loss.item():.3f}", cost=f"{expected.item():.3f}")
            derived = cost_model.fraction(cost_model.exact(gates.argmax()))
            seen = max(1, steps_per_epoch)
            log.log({
                "epoch": epoch + 1, "step": step, "tau": tau, "lambda": lambda_at(step / total_steps),
                **{k: v / seen for k, v in sums.items() if k != "expected"},
                f"expected_{target_kind}": sums["expected"] / seen,
                "choice_entropy": float(entropy(gates.probabilities())),
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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
