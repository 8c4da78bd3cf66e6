"""`anfast train`: the argparse front end of anfast.train.fit.

``register(subparsers)`` adds the command to the main ``anfast`` parser. Precedence of an option:
command line > --config YAML > the TrainConfig default; with --resume, the resumed
run's own options (its checkpoint's config) come before the defaults, so
`anfast train --out RUN --resume auto` continues RUN as it was started.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from anfast.cli.args import add_model_arguments, default_help as _default
from anfast.train.config import (BACKEND_CHOICES, COMPILE_CHOICES, LAMBDA_SCHEDULE_CHOICES,
                                 LOADER_CHOICES, OBJECTIVE_CHOICES, OPTIMIZER_CHOICES, ConfigError,
                                 TrainConfig, load_config)

__all__ = ["register", "add_train_arguments", "config_from_args"]

_DEFAULTS = TrainConfig()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; unset flags stay None so YAML can fill them."""
    add = parser.add_argument
    add("--config", help="YAML file of options (names as below, '-' or '_'); flags override it")
    add("--data", help="folder with train/<class>/*.jpg and val/<class>/*.jpg, or 'synthetic' "
                       "(one random batch made once on the device: compute throughput only) "
                       "(default: the built-in shapes set, generated on first use)")
    add("--num-classes", type=int, help="classes of --data synthetic (default: 1000)")
    add("--synthetic-steps", type=int,
        help=f"training steps per epoch of --data synthetic {_default('synthetic_steps')}")
    add_model_arguments(parser)
    add("--epochs", type=int, help=_default("epochs"))
    add("--accum-steps", type=int,
        help=f"gradient accumulation: micro-batches of --batch-size per optimizer step, so the "
             f"effective batch is accum-steps x batch-size x processes; the LR schedule, "
             f"--log-interval and stops count optimizer steps {_default('accum_steps')}")
    add("--lr", type=float, help=f"peak learning rate {_default('lr')}")
    add("--min-lr", type=float, help=f"learning rate at the end of the cosine {_default('min_lr')}")
    add("--optimizer", choices=OPTIMIZER_CHOICES,
        help=f"lamb needs NVIDIA apex {_default('optimizer')}")
    add("--momentum", type=float, help=f"SGD momentum {_default('momentum')}")
    add("--weight-decay", type=float, help=f"not applied to biases and norms {_default('weight_decay')}")
    add("--label-smoothing", type=float, help=f"on the base's cross-entropy {_default('label_smoothing')}")
    add("--lambda-schedule", choices=LAMBDA_SCHEDULE_CHOICES,
        help=f"distillation weight per epoch; paper is min(4 (e/E)^2, 1) {_default('lambda_schedule')}")
    add("--objective", choices=OBJECTIVE_CHOICES,
        help=f"adjoined: the paper's loss; base / student: that side alone with cross-entropy, "
             f"the baselines of benchmarks/paper_table.py {_default('objective')}")
    add("--teacher", help="with --objective student: distil the students from this export folder "
                          "(RUN_DIR/base of a trained run), Hinton et al. 2015")
    add("--distill-temperature", type=float, help=f"T of --teacher's softmax {_default('distill_temperature')}")
    add("--distill-weight", type=float,
        help=f"weight of --teacher's soft term, (1 - it) on the CE {_default('distill_weight')}")
    add("--warmup-epochs", type=float, help=f"linear LR warmup {_default('warmup_epochs')}")
    add("--clip-grad", type=float, help="max global gradient norm (default: no clipping)")
    add("--compile", nargs="?", const="default", choices=COMPILE_CHOICES,
        help="torch.compile the model; a bare --compile is mode default, reduce-overhead adds "
             "CUDA graphs (on the CPU it falls back to default) (default: off)")
    add("--no-compile", dest="compile", action="store_const", const=False,
        help="run eagerly (overrides a YAML compile:)")
    add("--streams", type=int,
        help=f"CUDA streams: 1, or one per network (the base and each student) so the students' "
             f"kernels run beside the base's; eager mode only {_default('streams')}")
    add("--cuda-graphs", action=argparse.BooleanOptionalAction,
        help=f"capture the whole training step (forward, backward, optimizer) as one CUDA graph "
             f"and replay it; CUDA, one process, no --compile {_default('cuda_graphs')}")
    add("--loader", choices=LOADER_CHOICES, help=f"input pipeline {_default('loader')}")
    add("--workers", type=int, help=f"loader worker processes / threads {_default('workers')}")
    add("--out", help=f"run directory {_default('out')}")
    add("--resume", help="checkpoint to continue from, or 'auto' (RUN_DIR/checkpoints/last.pt "
                         "whenever it loads, else the newer usable of last.prev.pt and best.pt; with none yet, the "
                         "run restarts from its config.yaml; in a new directory, a fresh start); "
                         "the run continues with the options it was started with, so give only "
                         "where it runs (--data, --device, --workers, ...)")
    add("--overwrite", action="store_true", default=None,
        help="replace the run already in --out (its checkpoints, metrics, exports); without it "
             "and without --resume, train refuses a run directory that holds a run")
    add("--seed", type=int, help=_default("seed"))
    add("--ema", action=argparse.BooleanOptionalAction,
        help=f"keep an EMA of the weights; evaluate and export it {_default('ema')}")
    add("--ema-decay", type=float, help=_default("ema_decay"))
    add("--sync-bn", action=argparse.BooleanOptionalAction,
        help=f"SyncBatchNorm across torchrun ranks, CUDA only {_default('sync_bn')}")
    add("--backend", choices=BACKEND_CHOICES,
        help=f"adjoined conv kernels; auto runs torch on the CPU and, on a GPU, the fastest "
             f"backend verified against torch (see `anfast tune`) {_default('backend')}")
    add("--log-interval", type=int,
        help=f"steps between reads of the loss and gradient norm on the host; the steps in "
             f"between never wait for the device {_default('log_interval')}")
    add("--max-bad-steps", type=int,
        help=f"non-finite steps to skip (weights untouched) before the run stops with an error "
             f"{_default('max_bad_steps')}")
    add("--pretrained", help="start the base from a local checkpoint: .safetensors, a torchvision / timm "
                             ".pt/.pth state_dict, or an anfast export folder (RUN_DIR/base); students "
                             "start as its slices")
    add("--pretrained-skip-classifier", action=argparse.BooleanOptionalAction,
        help=f"keep a fresh classifier (a checkpoint with another number of classes) "
             f"{_default('pretrained_skip_classifier')}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge TrainConfig defaults < the resumed run's options < --config YAML < explicit flags."""
    values = load_config(args.config) if args.config else {}
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values.update({name: value for name, value in vars(args).items()
                   if name in fields and value is not None})
    if values.get("resume"):
        values = {**resumed_run_options(values["resume"], values.get("out", _DEFAULTS.out)), **values}
    config = TrainConfig.from_dict(values)
    _check_flags_that_act_alone(args, config)
    return config


# Flags that act only with another option: (the option, how to turn it on). A flag given on
# the command line without it would change nothing, so it is refused. A YAML file is not
# checked: a run's own config.yaml, reused with --config, holds every option.
_ACTS_WITH = {
    "ema_decay": ("ema", "--ema"),
    "distill_temperature": ("teacher", "--teacher RUN_DIR/base (with --objective student)"),
    "distill_weight": ("teacher", "--teacher RUN_DIR/base (with --objective student)"),
}


def _check_flags_that_act_alone(args: argparse.Namespace, config: TrainConfig) -> None:
    """Refuse a flag of _ACTS_WITH given on the command line without the option it needs."""
    for name, (needed, how) in _ACTS_WITH.items():
        given = getattr(args, name, None)
        if given is not None and not getattr(config, needed):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {given:g} does nothing without --{needed}; "
                              f"add {how}, or leave {flag} out")


def resumed_run_options(resume: str, out: str) -> dict:
    """The options the run that ``--resume`` continues was started with, less where it ran
    (out, resume, overwrite): its checkpoint's config (see checkpoint.resume_checkpoint)
    or, for ``--resume auto`` in a run that saved no checkpoint yet, its config.yaml
    (rundir.restart_options); empty for a new directory (a fresh start)."""
    from anfast.runs.checkpoint import load_checkpoint, resume_checkpoint
    from anfast.train.export import ARCH_CONFIG_COPY
    from anfast.runs.rundir import restart_options

    path = resume_checkpoint(resume, out)
    if path is None:
        saved = restart_options(Path(out))
    else:
        saved = load_checkpoint(path, mmap=True).get("config") or {}  # the config only: tensors stay on disk
    fields = {field.name for field in dataclasses.fields(TrainConfig)} - {"out", "resume", "overwrite"}
    options = {name: value for name, value in saved.items() if name in fields}
    arch_copy = Path(out) / ARCH_CONFIG_COPY  # the run's own --arch-config, should the recorded path be gone
    if options.get("arch_config") and not Path(options["arch_config"]).is_file() and arch_copy.is_file():
        options["arch_config"] = str(arch_copy)
    return options


def run_train(args: argparse.Namespace) -> int:
    """`anfast train`; ConfigError, DataLayoutError, a non-finite loss and the other errors
    a user acts on reach anfast.cli.main, which prints them in one line."""
    from anfast.train.loop import fit

    summary = fit(config_from_args(args))
    if summary.get("interrupted"):
        print(f"anfast train: interrupted; checkpoint {summary['checkpoint']}")
    return 0


def register(subparsers) -> None:
    """Add `train` to the main parser's subcommands."""
    train = subparsers.add_parser(
        "train", help="train an adjoined network (base + students)",
        description="Train a CNN (torchvision, timm:NAME or anfast's XResNet) and its adjoined "
                    "students (Nath et al. 2022). "
                    "Writes config.yaml, metrics.jsonl, TensorBoard events, checkpoints, "
                    "curves.png, student/ and base/ exports and summary.json to --out.")
    add_train_arguments(train)
    train.set_defaults(func=run_train)
