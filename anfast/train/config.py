"""``TrainConfig``: every knob of a training run, in one dataclass.

The CLI fills it (anfast/cli/train.py), a YAML file may too (``--config``), and the
resolved config is written next to the run as config.yaml, timm's args.yaml habit.
Each default lives here and only here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import yaml

from anfast.runs.checkpoint import resume_checkpoint, write_text_atomically
from anfast.runs.errors import ConfigError
from anfast.runs.rundir import load_config

__all__ = ["TrainConfig", "ConfigError", "parse_alpha", "load_config", "save_config",
           "load_arch_config", "check_field_types", "AMP_CHOICES", "OPTIMIZER_CHOICES",
           "LOADER_CHOICES", "POLICY_CHOICES", "OBJECTIVE_CHOICES", "LAMBDA_SCHEDULE_CHOICES", "BACKEND_CHOICES",
           "COMPILE_CHOICES", "SYNTHETIC_DATA", "compile_mode", "RESUME_FIXED", "RESUME_FREE",
           "resume_conflicts"]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
OPTIMIZER_CHOICES = ("sgd", "adamw", "lamb")
LOADER_CHOICES = ("auto", "torch", "dali")
POLICY_CHOICES = ("paper", "all")
LAMBDA_SCHEDULE_CHOICES = ("paper", "linear", "constant")
OBJECTIVE_CHOICES = ("adjoined", "base", "student")  # anfast.loss: AdjoinedLoss / OneNetworkLoss
BACKEND_CHOICES = ("auto", "torch", "triton", "cuda")
COMPILE_CHOICES = ("default", "max-autotune", "reduce-overhead")  # torch.compile modes
SYNTHETIC_DATA = "synthetic"  # --data value: random batches made on the device, no files
# np.random.seed takes values below 2**32 and each process seeds seed + rank: 2**31 leaves
# room for any number of ranks; torch.manual_seed takes all of these.
MAX_SEED = 2**31 - 1


@dataclass
class TrainConfig:
    """One training run. Defaults train the quickstart on the built-in dataset.

    The quickstart defaults (resnet18, the paper's policy, alpha 4, 32 px, 4 epochs, AdamW)
    are sized for a 2-core CPU on the built-in shapes set; ImageNet runs set --arch,
    --image-size, --epochs, --lr and --batch-size.
    """

    data: Optional[str] = None            # ImageFolder root or "synthetic"; None: built-in set
    num_classes: Optional[int] = None     # --data synthetic only; None: 1000
    synthetic_steps: int = 100            # --data synthetic: training steps per epoch
    arch: str = "resnet18"                # torchvision name, xresnet50, timm:NAME (anfast.models)
    alpha: Tuple[float, ...] = (4.0,)     # one per student; nested students are prefixes
    policy: str = "paper"                 # "paper" | "all"; --arch-config overrides it
    arch_config: Optional[str] = None     # DAN search output: {"groups": {name: alpha}}
    round_to: int = 8
    epochs: int = 4
    batch_size: int = 64                  # per process
    accum_steps: int = 1                  # micro-batches of batch_size per optimizer step
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    lambda_schedule: str = "paper"        # distillation weight per epoch (anfast.loss)
    objective: str = "adjoined"           # adjoined (the paper) | base | student: one side alone
    teacher: Optional[str] = None         # --objective student: distil from this export folder
    distill_temperature: float = 4.0      # Hinton et al. 2015's T for --teacher
    distill_weight: float = 0.9           # weight of the soft term; (1 - it) on the CE
    warmup_epochs: float = 0.3
    min_lr: float = 0.0
    clip_grad: Optional[float] = None     # max global grad norm; None: no clipping
    amp: str = "auto"                     # auto: bf16 on CUDA, off on CPU
    channels_last: bool = False
    compile: Union[bool, str] = False     # a COMPILE_CHOICES mode; True means "default"
    streams: int = 1                      # CUDA streams: 1, or one per network (anfast.nn.streams)
    cuda_graphs: bool = False             # the whole step as one CUDA graph (anfast.train.graphs)
    loader: str = "auto"
    workers: int = 2
    image_size: int = 32
    out: str = "runs/train"
    resume: Optional[str] = None          # checkpoint path, or "auto"
    overwrite: bool = False               # replace the run already in `out` (see rundir.py)
    seed: int = 0
    ema: bool = False
    ema_decay: float = 0.999
    sync_bn: bool = False
    device: str = "auto"                  # auto: cuda if available, else cpu
    backend: str = "auto"                 # adjoined conv backend; auto: measured (DESIGN.md 4b)
    log_interval: int = 50                # steps between host reads of loss / grad norm
    max_bad_steps: int = 0                # non-finite steps skipped before the run stops
    pretrained: Optional[str] = None      # local checkpoint for the base (anfast.runs.pretrained)
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
        check_field_types(self, ConfigError)
        if not self.alpha:
            raise ConfigError("alpha is empty; give one width divisor, e.g. --alpha 4")
        for alpha in self.alpha:
            if not (math.isfinite(alpha) and alpha >= 1):
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
        _check_choice("backend", self.backend, BACKEND_CHOICES)
        _check_choice("objective", self.objective, OBJECTIVE_CHOICES)
        self._check_teacher()
        if self.backend == "auto":
            from anfast.ops.tuning import fused_backend_names
            try:
                fused_backend_names()  # $ANFAST_AUTO_BACKENDS names only fused backends
            except ValueError as error:
                raise ConfigError(str(error)) from None
        compile_mode(self.compile)
        self._check_step_engine()
        for name in ("epochs", "batch_size", "accum_steps", "image_size", "round_to", "log_interval",
                     "synthetic_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1]")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed={self.seed} must be in [0, {MAX_SEED}] (numpy seeds each process "
                              f"with seed + rank, below 2**32)")
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
        if self.max_bad_steps < 0:
            raise ConfigError(f"max_bad_steps={self.max_bad_steps} must be >= 0")
        if self.num_classes is not None and self.data != SYNTHETIC_DATA:
            raise ConfigError(f"--num-classes {self.num_classes} applies to --data synthetic only; "
                              f"a folder's classes are its class folders: leave --num-classes out")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num_classes={self.num_classes} must be >= 2")
        if self.data not in (None, SYNTHETIC_DATA) and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data}: no such directory; give a folder with "
                              f"train/<class>/*.jpg and val/<class>/*.jpg, or leave --data out "
                              f"for the built-in dataset")
        if self.arch_config is not None:
            # A run made before this check existed resumes with the alphas it was started with.
            if len(self.alpha) > 1 and self._starts_from_step_0():
                raise ConfigError(f"--arch-config {self.arch_config} sets each width group's alpha and "
                                  f"builds one student; --alpha {','.join(f'{a:g}' for a in self.alpha)} "
                                  f"asks for {len(self.alpha)} nested students, which would all be that "
                                  f"one: leave --alpha out, or train nested students without --arch-config")
            load_arch_config(self.arch_config)
            searched = json.loads(Path(self.arch_config).read_text())
            for name, flag in (("arch", "--arch"), ("round_to", "--round-to")):
                if name in searched and searched[name] != getattr(self, name):
                    raise ConfigError(f"--arch-config {self.arch_config} was searched with {flag} "
                                      f"{searched[name]}, this run has {flag} {getattr(self, name)}; "
                                      f"pass {flag} {searched[name]} (other values build another student)")
        if self.overwrite and self.resume is not None and (
                self.resume == "auto" or Path(self.resume).resolve().is_relative_to(Path(self.out).resolve())):
            raise ConfigError(f"--resume {self.resume} continues the run in --out {self.out} and "
                              f"--overwrite deletes it; give one of the two")
        # A resume takes its weights from the checkpoint and never reads --pretrained (the CLI
        # copies it from the checkpoint's config): only a start from step 0 needs the file.
        if self.pretrained is not None and not Path(self.pretrained).exists() and self._starts_from_step_0():
            raise ConfigError(f"--pretrained {self.pretrained}: no such file or folder; give a local "
                              f".safetensors / .pt file or an anfast export folder (anfast never downloads)")
        return self

    def _starts_from_step_0(self) -> bool:
        """No --resume, or --resume auto in a run that saved no checkpoint yet (a fresh start or
        a restart from its config.yaml); the checkpoints are memory-mapped, not read."""
        return self.resume is None or resume_checkpoint(self.resume, self.out) is None

    def _check_teacher(self) -> None:
        """--teacher distils the students alone: it needs --objective student and an export folder."""
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature={self.distill_temperature} must be > 0 (Hinton et al. use 4)")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"distill_weight={self.distill_weight} must be in [0, 1]")
        if self.teacher is None:
            return
        if self.objective != "student":
            raise ConfigError(f"--teacher {self.teacher} distils the students trained alone; add "
                              f"--objective student (the AN objective has the base as its teacher)")
        if not (Path(self.teacher) / "config.json").is_file():
            raise ConfigError(f"--teacher {self.teacher}: not an anfast export folder (no config.json); "
                              f"give RUN_DIR/base of a finished `anfast train` run")

    def _check_step_engine(self) -> None:
        """--streams and --cuda-graphs against each other and the options they cannot run with."""
        networks = len(self.alpha) + 1
        if self.streams not in (1, networks):
            raise ConfigError(f"streams={self.streams}: use 1 (one stream) or {networks} (one per "
                              f"network: the base and {networks - 1} student(s))")
        if self.streams > 1 and compile_mode(self.compile) is not None:
            raise ConfigError("--streams runs the students on their own CUDA streams in eager mode; "
                              "torch.compile schedules the one graph itself: leave out --streams or --compile")
        if not self.cuda_graphs:
            return
        refusals = [
            (compile_mode(self.compile) is not None,
             "--compile (use --compile reduce-overhead for inductor's CUDA graphs, or --cuda-graphs alone)"),
            (self.accum_steps > 1, "--accum-steps > 1 (capture one micro-batch per step)"),
            (self.optimizer == "lamb", "--optimizer lamb (apex FusedLAMB reads its step count on the "
                                       "host; use sgd or adamw)"),
            (self.amp == "fp16", "--amp fp16 (GradScaler; use --amp bf16)"),
            (self.streams > 1, "--streams (a captured step runs on one stream)"),
        ]
        for refused, why in refusals:
            if refused:
                raise ConfigError(f"--cuda-graphs cannot run with {why}")


# A resumed run continues the run it resumes, as if never stopped: these options shape its
# network, data stream or optimizer steps and must be what the run was started with.
# The data folder may move (its classes and batches per epoch are checked instead).
RESUME_FIXED = ("num_classes", "synthetic_steps", "arch", "alpha", "policy", "round_to", "epochs",
                "batch_size", "accum_steps", "lr", "min_lr", "optimizer", "momentum", "weight_decay",
                "label_smoothing", "lambda_schedule", "objective", "distill_temperature", "distill_weight",
                "warmup_epochs", "clip_grad", "amp",
                "image_size", "seed", "ema", "ema_decay", "sync_bn")
# Options a resumed run takes from its command line: where and how it runs, not what it computes.
# arch_config may name another copy of the same file (its widths are checked by loading the weights),
# teacher another copy of the same export (checked by resume_conflicts and the weights' digest).
RESUME_FREE = ("data", "arch_config", "channels_last", "compile", "streams", "cuda_graphs", "loader",
               "workers", "out", "resume", "overwrite", "device", "backend", "log_interval", "max_bad_steps", "pretrained",
               "pretrained_skip_classifier", "teacher")


def resume_conflicts(saved: Dict[str, Any], config: "TrainConfig") -> List[str]:
    """The RESUME_FIXED options where ``config`` differs from ``saved`` (a checkpoint's
    config), each as ``--name NEW (the run: OLD)``; options ``saved`` lacks are not compared."""
    def show(value: Any) -> str:
        return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)

    current = config.to_dict()
    conflicts = []
    for name in RESUME_FIXED:
        if name not in saved:
            continue
        old, new = saved[name], current[name]
        if isinstance(old, (list, tuple)):  # alpha
            old = [float(v) for v in old]
        if old != new:
            conflicts.append(f"--{name.replace('_', '-')} {show(new)} (the run: {show(old)})")
    # The teacher's folder may move (RESUME_FREE), but a run taught by one is taught by one
    # (its weights are compared by digest where the checkpoint holds one: anfast.train.loop).
    if "teacher" in saved and (saved["teacher"] is None) != (config.teacher is None):
        conflicts.append(f"--teacher {config.teacher} (the run: none)" if saved["teacher"] is None
                         else f"no --teacher (the run: --teacher {saved['teacher']})")
    return conflicts


def check_field_types(config: Any, error: Type[Exception]) -> None:
    """Check and normalise every field of the dataclass ``config`` against its annotation.

    One rule for the command line, YAML and Python callers: numbers must be finite,
    integer options whole (2.0 becomes 2; a numeric string such as YAML's ``1e-3``,
    which YAML 1.1 reads as text, becomes its number), booleans real booleans, text
    text; ``None`` only where the field is Optional. Raises ``error`` naming the field.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        kinds = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is Union else (hints[name],)
        if value is None:
            if type(None) not in kinds:
                raise error(f"{name} is missing a value; give one (default: {field.default!r})")
            continue
        kind = next(k for k in kinds if k is not type(None))
        default = field.default
        example = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
        if set(kinds) >= {bool, str}:  # --compile: true / false or a mode name
            if not isinstance(value, (bool, str)):
                raise error(f"{name}={value!r} must be true, false or a name")
        elif kind in (int, float):
            setattr(config, name, _number(name, value, kind, example, error))
        elif typing.get_origin(kind) is tuple:
            setattr(config, name, tuple(_number(name, item, float, example, error) for item in value))
        elif kind in (bool, str) and not isinstance(value, kind):
            raise error(f"{name}={value!r} must be {'true or false' if kind is bool else 'text'}")


def _number(name: str, value: Any, kind: type, example: Any, error: Type[Exception]) -> Union[int, float]:
    what = "a whole number" if kind is int else "a number"
    default = f" (default: {example})" if example is not None else ""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise error(f"{name}={value!r} is not {what}{default}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}={value!r} is not {what}{default}")
    if not math.isfinite(value):
        raise error(f"{name}={value}: give a finite number{default}")
    if kind is int:
        if value != int(value):
            raise error(f"{name}={value} must be a whole number{default}")
        return int(value)
    return float(value)


def compile_mode(value: Union[bool, str, None]) -> Optional[str]:
    """--compile as a torch.compile mode, or None for eager: True (a bare --compile or YAML
    ``true``) is "default"; False / None is off."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_CHOICES:
        raise ConfigError(f"compile={value!r}; choose one of {list(COMPILE_CHOICES)}, true "
                          f"(= default) or false")
    return value


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; choose one of {list(choices)}")


def parse_alpha(value: Union[str, float, int, list, tuple, None]) -> Tuple[float, ...]:
    """"4" -> (4.0,); "2,4" -> (2.0, 4.0); also numbers and flat lists of numbers or numeric
    text. Anything else (YAML ``alpha:`` with no value, ``true``, ``[[2]]``) is a ConfigError."""
    default = ",".join(f"{alpha:g}" for alpha in TrainConfig.alpha)
    if value is None:
        raise ConfigError(f"alpha is missing a value; give one (default: {default})")
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    not_alpha = ConfigError(f"alpha={value!r}: expected a number or a comma list such as 2,4,8 "
                            f"(default: {default})")
    if not all(isinstance(part, (int, float, str)) and not isinstance(part, bool) for part in parts):
        raise not_alpha
    try:
        return tuple(float(part) for part in parts if str(part).strip())
    except ValueError:
        raise not_alpha from None


def load_arch_config(path: str) -> Dict[str, float]:
    """Read a DAN arch JSON ``{"groups": {group name: alpha}}`` into adjoin's dict policy."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--arch-config {path}: no such file; pass the arch JSON written by "
                          f"`anfast search`")
    try:
        groups = json.loads(file.read_text())["groups"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"--arch-config {path}: expected JSON {{\"groups\": {{\"<group name>\": "
                          f"alpha, ...}}}} ({error})") from None
    if isinstance(groups, dict):  # `anfast search` writes {"<group>": {"alpha": a, "channels": C, "width": w}}
        groups = {name: entry.get("alpha") if isinstance(entry, dict) else entry for name, entry in groups.items()}
    if not isinstance(groups, dict) or not all(
            isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
            and alpha >= 1 for alpha in groups.values()):
        raise ConfigError(f"--arch-config {path}: \"groups\" must map group names to finite "
                          f"numbers >= 1")
    return {str(name): float(alpha) for name, alpha in groups.items()}


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (loadable with ``--config``)."""
    # Reused with --config for another --out, a saved `overwrite: true` would delete that run
    # and a saved `resume` would continue the old run there instead of training a new one.
    write_text_atomically(path, yaml.safe_dump({**config.to_dict(), "overwrite": False, "resume": None},
                                               sort_keys=False))
