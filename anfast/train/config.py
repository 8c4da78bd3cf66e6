"""``TrainConfig``: every knob of a training run, in one dataclass.

The CLI fills it (anfast/train/cli.py), a YAML file may too (``--config``), and the
resolved config is written next to the run as config.yaml, timm's args.yaml habit.
Each default lives here and only here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import yaml

__all__ = ["TrainConfig", "ConfigError", "parse_alpha", "load_config", "save_config",
           "load_arch_config", "AMP_CHOICES", "OPTIMIZER_CHOICES", "LOADER_CHOICES",
           "POLICY_CHOICES", "LAMBDA_SCHEDULE_CHOICES"]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
OPTIMIZER_CHOICES = ("sgd", "adamw", "lamb")
LOADER_CHOICES = ("auto", "torch", "dali")
POLICY_CHOICES = ("paper", "all")
LAMBDA_SCHEDULE_CHOICES = ("paper", "linear", "constant")


class ConfigError(ValueError):
    """A training option that cannot work; raised before the first step."""


@dataclass
class TrainConfig:
    """One training run. Defaults train the quickstart on the built-in dataset.

    The quickstart defaults (resnet18, the paper's policy, alpha 4, 32 px, 4 epochs, AdamW)
    are sized for a 2-core CPU on the built-in shapes set; ImageNet runs set --arch,
    --image-size, --epochs, --lr and --batch-size.
    """

    data: Optional[str] = None            # train/ and val/ ImageFolder root; None: built-in set
    arch: str = "resnet18"                # torchvision name, xresnet50, timm:NAME (anfast.models)
    alpha: Tuple[float, ...] = (4.0,)     # one per student; nested students are prefixes
    policy: str = "paper"                 # "paper" | "all"; --arch-config overrides it
    arch_config: Optional[str] = None     # DAN search output: {"groups": {name: alpha}}
    round_to: int = 8
    epochs: int = 4
    batch_size: int = 64                  # per process
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    lambda_schedule: str = "paper"        # distillation weight per epoch (anfast.train.loss)
    warmup_epochs: float = 0.3
    min_lr: float = 0.0
    clip_grad: Optional[float] = None     # max global grad norm; None: no clipping
    amp: str = "auto"                     # auto: bf16 on CUDA, off on CPU
    channels_last: bool = False
    compile: bool = False
    loader: str = "auto"
    workers: int = 2
    image_size: int = 32
    out: str = "runs/train"
    resume: Optional[str] = None          # checkpoint path, or "auto"
    seed: int = 0
    ema: bool = False
    ema_decay: float = 0.999
    sync_bn: bool = False
    device: str = "auto"                  # auto: cuda if available, else cpu
    pretrained: Optional[str] = None      # local checkpoint for the base (anfast.train.pretrained)
    pretrained_skip_classifier: bool = False  # keep a fresh classifier (another number of classes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only, so YAML and ``torch.load(weights_only=True)`` both accept it."""
        values = dataclasses.asdict(self)
        values["alpha"] = list(self.alpha)
        return values

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options: {sorted(known)}")
        values = dict(values)
        if "alpha" in values:
            values["alpha"] = parse_alpha(values["alpha"])
        return cls(**values)

    def validate(self) -> "TrainConfig":
        """Check the options that need no data or model; returns self."""
        if not self.alpha:
            raise ConfigError("alpha is empty; give one width divisor, e.g. --alpha 4")
        for alpha in self.alpha:
            if not alpha >= 1:
                raise ConfigError(
                    f"alpha={alpha:g}: a student is the base's width divided by alpha, so "
                    f"alpha must be >= 1 (e.g. --alpha 4, or --alpha 2,4 for nested students)")
        if list(self.alpha) != sorted(self.alpha):
            raise ConfigError(f"alpha={list(self.alpha)}: nested students go from widest to "
                              f"narrowest; sort them ascending, e.g. --alpha 2,4,8")
        _check_choice("policy", self.policy, POLICY_CHOICES)
        _check_choice("optimizer", self.optimizer, OPTIMIZER_CHOICES)
        _check_choice("amp", self.amp, AMP_CHOICES)
        _check_choice("loader", self.loader, LOADER_CHOICES)
        _check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULE_CHOICES)
        for name in ("epochs", "batch_size", "image_size", "round_to"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad={self.clip_grad} must be > 0 (or unset for no clipping)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in (0, 1)")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers} must be >= 0")
        if self.data is not None and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data}: no such directory; give a folder with "
                              f"train/<class>/*.jpg and val/<class>/*.jpg, or leave --data out "
                              f"for the built-in dataset")
        if self.arch_config is not None:
            load_arch_config(self.arch_config)
        if self.pretrained is not None and not Path(self.pretrained).exists():
            raise ConfigError(f"--pretrained {self.pretrained}: no such file or folder; give a local "
                              f".safetensors / .pt file or an anfast export folder (anfast never downloads)")
        return self


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; choose one of {list(choices)}")


def parse_alpha(value: Union[str, float, int, list, tuple]) -> Tuple[float, ...]:
    """"4" -> (4.0,); "2,4" -> (2.0, 4.0); also numbers and lists."""
    if isinstance(value, (int, float)):
        return (float(value),)
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(float(part) for part in parts if str(part).strip())
    except ValueError:
        raise ConfigError(f"alpha={value!r}: expected a number or a comma list such as 2,4,8") from None


def load_arch_config(path: str) -> Dict[str, float]:
    """Read a DAN arch JSON ``{"groups": {group name: alpha}}`` into adjoin's dict policy."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--arch-config {path}: no such file; pass the arch JSON written by "
                          f"`anfast search`")
    try:
        groups = json.loads(file.read_text())["groups"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"--arch-config {path}: expected JSON {{\"groups\": {{\"<group name>\": "
                          f"alpha, ...}}}} ({error})") from None
    if isinstance(groups, dict):  # `anfast search` writes {"<group>": {"alpha": a, "channels": C, "width": w}}
        groups = {name: entry.get("alpha") if isinstance(entry, dict) else entry for name, entry in groups.items()}
    if not isinstance(groups, dict) or not all(
            isinstance(alpha, (int, float)) and alpha >= 1 for alpha in groups.values()):
        raise ConfigError(f"--arch-config {path}: \"groups\" must map group names to numbers >= 1")
    return {str(name): float(alpha) for name, alpha in groups.items()}


def load_config(path: str) -> Dict[str, Any]:
    """The options in a YAML file, as a dict of TrainConfig field names."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    values = yaml.safe_load(file.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a YAML mapping of option: value")
    return {key.replace("-", "_"): value for key, value in values.items()}


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (loadable with ``--config``)."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
