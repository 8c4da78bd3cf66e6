"""``fit(config)``: train an adjoined network, set-up, epochs and summary read top to bottom.

Order of events: validate the config, join torchrun, open the loaders and build the
model and optimizer (every bad option fails here, before the first step), resume if
asked, then per epoch: train steps (warmup + cosine LR, AMP, clipping, EMA), evaluate
the base and every student, log, checkpoint. At the end: curves.png, exports of
the base and the students, summary.json. SIGTERM / SIGINT end the run between two
steps with a checkpoint; ``--resume`` continues it to the same numbers.

The steps themselves never wait for the device (anfast.train.step): the loss and
gradient norm are read on the host every --log-interval steps, at epoch end and at a
stop; non-finite steps are skipped on the device and counted.

What the set-up builds is one ``Run``, which the epoch loop only reads; what the run
has done so far (counters, sums, history) is one ``RunState`` (anfast.train.state),
passed to each function that changes it and saved flat in every checkpoint.

The engine is shared by every kind of run: ``Training`` (the default, `anfast train`)
says which data and network, what each epoch and the end write; anfast.dan.search's
``Search`` runs a DAN width search through the same set-up, steps and checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from anfast.data import builtin_dataset, create_loader
from anfast.data.folder import class_mismatch
from anfast.data.synthetic import DEFAULT_SYNTHETIC_CLASSES, SyntheticLoader
from anfast.export import export_digest, load_student
from anfast.loss import AdjoinedLoss, OneNetworkLoss, TaughtOutput, get_lambda_schedule
from anfast.nn import convert_sync_batchnorm
from anfast.nn.backends import collect_layer_problems, layer_backends, prepare_backends, set_backend
from anfast.ops.backend import BACKEND_PRIORITY, backend_reasons
from anfast.runs.checkpoint import (auto_resume_checkpoint, checkpoint_world_size, get_rng_state,
                                    load_training_checkpoint, rank_rng_state, remove_stale_temp_files,
                                    reporting_full_disk, resume_checkpoint, save_checkpoint, set_rng_state,
                                    write_text_atomically)
from anfast.runs.distributed import (DistributedInfo, all_reduce_sum, any_rank, any_rank_on_host,
                                     barrier, broadcast_buffers, create_host_group,
                                     destroy_distributed, gather_on_main, init_distributed)
from anfast.runs.errors import RunStoppedError
from anfast.runs.pretrained import load_pretrained
from anfast.runs.records import MetricsLog, plot_curves, plot_tradeoff
from anfast.runs.rundir import TRAIN_ARTIFACTS, RunDirLock, claim_run_dir, restart_options
from anfast.runs.schedule import lr_at
from anfast.streams import use_streams
from anfast.train.build import (check_environment, create_adjoined_model, create_optimizer,
                                resolve_amp_dtype)
from anfast.train.config import (SYNTHETIC_DATA, ConfigError, TrainConfig, compile_mode, resume_conflicts,
                                 save_config)
from anfast.train.evaluate import evaluate, format_table, network_costs
from anfast.train.export import ARCH_CONFIG_COPY, export_networks
from anfast.train.graphs import (CapturedStep, cudagraph_skips, set_learning_rate, step_state_tensors,
                                 tensor_learning_rates)
from anfast.train.state import RunState
from anfast.train.step import StepMeter, ema_update, resolve_compile, train_step, warm_up

__all__ = ["fit", "Training", "Run", "Parts", "Data", "Schedule", "NonFiniteLossError", "resolve_resume_path",
           "prepare_network", "loader_options", "data_root", "check_resumed_data"]


class NonFiniteLossError(RunStoppedError):
    """More steps than --max-bad-steps had a NaN / inf loss or gradient (each was skipped)."""


class StopOnSignal:
    """Turn SIGTERM / SIGINT into a flag the loop polls, so it stops between two steps.

    Saving inside the handler could interrupt a half-done optimizer step; the loop
    saves instead. A second Ctrl-C raises KeyboardInterrupt as usual. Nested, the flag
    is raised in every enclosing StopOnSignal too: a program that runs fit in a loop
    (benchmarks/paper_table.py) sees a stop that came during a run, whatever the run
    returned.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle)
                              for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        outer = getattr(self._previous.get(signum), "__self__", None)
        while isinstance(outer, StopOnSignal):
            outer.requested = True
            outer = getattr(outer._previous.get(signum), "__self__", None)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# How a refused --resume of `anfast train` says to keep the run's options.
KEEP_THE_RUNS_OPTIONS = "leave these options out (the CLI then takes the run's)"


def resolve_resume_path(config: TrainConfig, keep_options: str = KEEP_THE_RUNS_OPTIONS) -> Optional[Path]:
    """The checkpoint the run continues (checkpoint.resume_checkpoint: for --resume auto
    last.pt, or when it is unusable the newer usable one of last.prev.pt and best.pt), or
    None for a fresh start. --resume auto in a run that saved no checkpoint yet restarts
    it, with the options of its config.yaml (rundir.restart_options); ``keep_options`` is
    the refusal's advice when the command line changes one."""
    if config.resume is None:
        return None
    path = resume_checkpoint(config.resume, config.out)
    if path is None:
        conflicts = resume_conflicts(restart_options(Path(config.out)), config)
        if conflicts:
            raise ConfigError(f"--resume auto restarts the run in --out {config.out} from its "
                              f"config.yaml (it saved no checkpoint yet), but {'; '.join(conflicts)}; "
                              f"{keep_options}, or start a new run in another --out")
    return path


def fit(config: TrainConfig, *, should_stop: Optional[Callable[[int], bool]] = None,
        kind: Optional["Training"] = None) -> Any:
    """Train ``config`` to the end (or to a stop request) and return the run summary.

    ``should_stop(step)`` is polled after every optimizer step next to SIGTERM / SIGINT,
    for programs that embed a run under their own time limit. A stopped run saves
    checkpoints/last.pt and returns {"interrupted": True, ...}; resume it with
    ``config.resume = "auto"``.

    ``kind`` is what the run trains and reports; the default, ``Training()``, is
    `anfast train`'s, and anfast.dan.search runs a DAN search on the same engine.
    """
    config.validate()
    kind = kind if kind is not None else Training()
    # Handlers go in first: a signal during set-up must also end the run cleanly.
    with StopOnSignal() as stop_signal:
        info = init_distributed(config.device)
        try:
            lock = _claim_run_dir(config, info, kind.artifacts)
            try:
                return _fit(config, info, should_stop, stop_signal, lock, kind)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            destroy_distributed()


def _claim_run_dir(config: TrainConfig, info: DistributedInfo, artifacts: Sequence[str]
                   ) -> Optional[RunDirLock]:
    """Rank 0 locks --out (see rundir.py); every rank stops when it is refused."""
    refusal, lock = None, None
    if info.is_main:
        try:
            lock = claim_run_dir(Path(config.out), artifacts, resume=config.resume is not None,
                                 overwrite=config.overwrite)
        except ConfigError as error:
            refusal = error
    refused, = any_rank([refusal is not None], info.device)
    if refused:
        raise refusal or ConfigError(f"--out {config.out}: refused on rank 0 (see its message)")
    return lock


def check_resumed_data(checkpoint: Dict[str, Any], resume_path: Path, root: Any,
                       train_loader: Any) -> None:
    """A resumed run must read the data it was trained on: the same classes in the same
    order, and as many batches per epoch per process (same images, batch size, processes)."""
    classes, batches = checkpoint.get("classes"), checkpoint.get("batches_per_epoch")
    if classes is not None and list(classes) != list(train_loader.classes):
        raise ConfigError(f"--resume {resume_path}: the run was trained on classes "
                          f"{_preview(classes)}, {root} has {_preview(train_loader.classes)}; "
                          f"resume with the run's data (--data)")
    if batches is not None and batches != len(train_loader):
        raise ConfigError(f"--resume {resume_path}: the run had {batches} batches per epoch per "
                          f"process, {root} gives {len(train_loader)} here; resume with the same "
                          f"images and number of processes")


def _check_backend(an: torch.nn.Module, config: TrainConfig, device: torch.device,
                   amp_dtype: Optional[torch.dtype]) -> None:
    """A named fused --backend must run every adjoined conv of this network on this device,
    checked on one forward pass before anything is written: `--backend cuda` on a CPU
    machine once failed only at step 1, after --overwrite had deleted the old run. Under
    --backend auto, $ANFAST_BACKEND names the backend (anfast.ops.dispatch), so it is
    checked the same way."""
    backend, named = config.backend, f"--backend {config.backend}"
    fix = "use --backend auto (or torch)"
    environment = os.environ.get("ANFAST_BACKEND", "")
    if backend == "auto" and environment not in ("", "auto"):
        backend, named = environment, f"$ANFAST_BACKEND={environment}"
        fix = "unset ANFAST_BACKEND (auto then chooses per conv) or set it to torch"
        if backend not in BACKEND_PRIORITY:
            raise ConfigError(f"{named} is not a backend: choose one of {', '.join(BACKEND_PRIORITY)}, "
                              f"or unset it")
    if backend in ("auto", "torch"):
        return
    set_backend(an, "torch")
    for layer, problem, _ in collect_layer_problems(an, config.batch_size, config.image_size, amp_dtype):
        reasons = backend_reasons(backend, problem, explicit=True)
        if reasons:
            raise ConfigError(f"{named} cannot run {layer} on {device}: {'; '.join(reasons)}; {fix}")


def _set_aside_unusable_last(config: TrainConfig, resume_path: Optional[Path], checkpoint_dir: Path,
                             info: DistributedInfo, command: str) -> None:
    """--resume auto continues from last.prev.pt or best.pt only when last.pt is unusable (a
    directory, a dangling symlink, damaged): rename it to last.unusable.pt, so the next save
    neither fails on it nor keeps it as last.prev.pt in place of a good checkpoint."""
    last = checkpoint_dir / "last.pt"
    if config.resume != "auto" or resume_path is None or resume_path == last or not os.path.lexists(last):
        return
    why = auto_resume_checkpoint(checkpoint_dir)[1]["last.pt"]
    aside = checkpoint_dir / "last.unusable.pt"
    os.replace(last, aside)
    _say(info, f"{command}: {last} is {why}; renamed it {aside.name} and resuming from "
               f"{resume_path.name}")


def _check_one_image_batches(an: torch.nn.Module, image_size: int) -> None:
    """Training-mode BatchNorm needs more than one value per channel: with one image per
    batch, a layer whose output is 1x1 at ``image_size`` has one. Run on the meta device,
    so the run stops here and not at its first step."""
    probe = copy.deepcopy(an).to("meta").train()
    try:
        with torch.no_grad():
            probe(torch.empty(1, 3, image_size, image_size, device="meta"))
    except ValueError as error:
        if "more than 1 value per channel" not in str(error):
            raise
        raise ConfigError(f"--batch-size 1 at --image-size {image_size}: a BatchNorm layer would see "
                          f"one value per channel ({error}); use --batch-size 2 or more, or a larger "
                          f"--image-size") from None


def _effective_batch(config: TrainConfig, batches_per_epoch: int, world_size: int) -> int:
    """Images per optimizer step: --accum-steps micro-batches of every process, or all of an
    epoch's batches when it has fewer."""
    return min(config.accum_steps, batches_per_epoch) * config.batch_size * world_size


def _preview(names: Sequence[str]) -> str:
    names = list(names)
    return str(names[:5])[:-1] + (f", ... {len(names)} in all]" if len(names) > 5 else "]")


@dataclass
class Schedule:
    """The run's optimizer steps: each takes --accum-steps micro-batches (an epoch's last
    step the rest), under warmup + cosine LR (anfast.runs.schedule)."""

    accum_steps: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    effective_batch: int  # images per optimizer step, all processes
    base_lr: float
    min_lr: float

    @classmethod
    def create(cls, config: TrainConfig, batches_per_epoch: int, world_size: int) -> "Schedule":
        steps_per_epoch = math.ceil(batches_per_epoch / config.accum_steps)
        return cls(accum_steps=config.accum_steps, batches_per_epoch=batches_per_epoch,
                   steps_per_epoch=steps_per_epoch, total_steps=config.epochs * steps_per_epoch,
                   warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                   effective_batch=_effective_batch(config, batches_per_epoch, world_size),
                   base_lr=config.lr, min_lr=config.min_lr)

    def lr(self, step: int) -> float:
        return lr_at(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     base_lr=self.base_lr, min_lr=self.min_lr)


@dataclass
class Data:
    """The run's loaders and where they read (a folder, or "synthetic")."""

    train_loader: Any
    val_loader: Any
    root: Any


@dataclass
class Parts:
    """The trained network and what trains it, built before anything is written."""

    an: torch.nn.Module
    trained: torch.nn.Module  # what the steps train: ``an``, or a module around it (DAN's gates)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Optional[AveragedModel]  # its own update (step.ema_update): no host reads
    loss_fn: torch.nn.Module
    lambda_schedule: Callable[[float], float]


@dataclass
class Run:
    """What the epoch loop reads. Set up once and never replaced; the objects inside
    (model, optimizer, log) change as they train, the run's counters live in RunState."""

    config: TrainConfig
    kind: "Training"
    info: DistributedInfo
    amp_dtype: Optional[torch.dtype]
    data: Data
    parts: Parts
    schedule: Schedule
    compile_mode: Optional[str]
    model: torch.nn.Module       # what the steps call: DDP, --teacher and torch.compile around parts.trained
    eval_model: torch.nn.Module  # the EMA when there is one
    log: Optional[MetricsLog]    # rank 0 only
    host_group: Any              # agrees on stops between ranks (create_host_group)
    stop_signal: StopOnSignal
    should_stop: Optional[Callable[[int], bool]]
    started: float               # perf_counter at the start of this process's run
    teacher_sha256: Optional[str]  # export_digest of --teacher, kept in the checkpoint

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def _fit(config: TrainConfig, info: DistributedInfo, should_stop: Optional[Callable[[int], bool]],
         stop_signal: StopOnSignal, lock: Optional[RunDirLock], kind: "Training") -> Any:
    started = time.perf_counter()
    check_environment(config, info.device)
    amp_dtype = resolve_amp_dtype(config.amp, info.device)
    teacher_sha256 = export_digest(config.teacher) if config.teacher is not None else None
    resume_path, checkpoint = _open_resumed_checkpoint(config, info, kind, teacher_sha256)
    torch.manual_seed(config.seed + info.rank)
    np.random.seed(config.seed + info.rank)

    # Data, model and optimizer, all before the first step so bad options fail early.
    data = kind.open_data(config, info, checkpoint, resume_path)
    parts = kind.build(config, info, data, amp_dtype, pretrained=resume_path is None)
    schedule = Schedule.create(config, len(data.train_loader), info.world_size)
    mode = _compile_mode(config, info, kind, parts, len(data.train_loader.classes), amp_dtype)
    state, resume_rng = _restore(kind, parts, checkpoint, resume_path, info.rank)
    config, log = _open_run_dir(config, kind, info, lock, resume_path, state, data, schedule)
    model = _training_model(config, info, parts.trained, mode, schedule, kind.find_unused_parameters)
    run = Run(config=config, kind=kind, info=info, amp_dtype=amp_dtype, data=data, parts=parts,
              schedule=schedule, compile_mode=mode, model=model,
              eval_model=parts.ema.module if parts.ema else parts.an, log=log,
              host_group=create_host_group(), stop_signal=stop_signal, should_stop=should_stop,
              started=started, teacher_sha256=teacher_sha256)
    stepper = Stepper(run, state)

    while state.epoch < config.epochs:
        lambda_ = parts.lambda_schedule(state.epoch / config.epochs)
        epoch_start = time.perf_counter() - state.epoch_seconds
        if not _train_epoch(run, state, stepper, lambda_, epoch_start, resume_rng):
            return _save_stopped_run(run, state)
        _end_epoch(run, state, lambda_, epoch_start)
        # A stop requested during the epoch's evaluation and checkpoint, after its last step,
        # ends the run here, before the next epoch or the final exports (a resumed run
        # starts there); it was once noticed by no one, and the run went on.
        if any_rank_on_host(_stop_requested(run, state.step), run.host_group):
            return _save_stopped_run(run, state)
    summary = kind.finish(run, state)
    if isinstance(summary, dict) and stop_signal.requested:
        # The run is whole; a program running it (benchmarks/paper_table.py) learns that it
        # was asked to stop while the run wrote its exports, and stops too.
        summary["stop_requested"] = True
    return summary


def _open_resumed_checkpoint(config: TrainConfig, info: DistributedInfo, kind: "Training",
                             teacher_sha256: Optional[str]) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The checkpoint --resume continues and its contents (None, None for a fresh start);
    refused when it is another kind of run's (a search's for `anfast train`), when it was
    trained by another number of processes, then when the command line changes an option
    the run was started with, or gives a --teacher whose weights (``teacher_sha256``,
    export_digest) are not the run's teacher's."""
    resume_path = resolve_resume_path(config, kind.keep_options)
    if resume_path is None:
        return None, None
    checkpoint = load_training_checkpoint(resume_path, map_location=info.device)
    kind.check_resumed(checkpoint, resume_path)
    world_size = checkpoint_world_size(checkpoint)
    if world_size not in (None, info.world_size):
        # Each rank continues its own random draws (dropout, noise), saved per rank.
        how = ("in one process, without torchrun" if world_size == 1
               else f"with {world_size} processes in all (torchrun --nnodes x --nproc_per_node = {world_size})")
        raise ConfigError(f"--resume {resume_path}: the run was trained with world size {world_size}, this "
                          f"process has world size {info.world_size}; resume it {how}")
    saved = checkpoint["config"] or {}
    conflicts = resume_conflicts(saved, config)
    if None not in (teacher_sha256, checkpoint.get("teacher_sha256")) and teacher_sha256 != checkpoint["teacher_sha256"]:
        conflicts.append(f"--teacher {config.teacher} holds other weights than the run's teacher "
                         f"(--teacher {saved.get('teacher')} when it was started)")
    if conflicts:
        raise ConfigError(f"--resume {resume_path} continues a run, with the options it was "
                          f"started with, but {'; '.join(conflicts)}; {kind.keep_options}, or "
                          f"start a new run in another --out")
    return resume_path, checkpoint


def _open_data(config: TrainConfig, info: DistributedInfo, checkpoint: Optional[Dict[str, Any]],
               resume_path: Optional[Path]) -> Data:
    """The train and val loaders, checked against each other and the resumed run."""
    if config.data == SYNTHETIC_DATA:
        train_loader, val_loader = _synthetic_loaders(config, info)
        root = SYNTHETIC_DATA
    else:
        root = data_root(config, info)
        train_loader = create_loader(root, "train", **loader_options(config, info))
        val_loader = create_loader(root, "val", **loader_options(config, info))
    mismatch = class_mismatch(train_loader.classes, val_loader.classes)
    if mismatch:
        raise ConfigError(f"{root}: {mismatch}")
    if len(train_loader) == 0:
        raise ConfigError(f"{root}/train has {train_loader.num_samples} images per process, "
                          f"fewer than one batch of {config.batch_size}; lower --batch-size")
    if checkpoint is not None:
        check_resumed_data(checkpoint, resume_path, root, train_loader)
    return Data(train_loader, val_loader, root)


def loader_options(config: TrainConfig, info: DistributedInfo) -> Dict[str, Any]:
    """create_loader's options for this process's shard of a folder."""
    return dict(batch_size=config.batch_size, image_size=config.image_size, loader=config.loader,
                workers=config.workers, device=info.device, channels_last=config.channels_last,
                shard_id=info.rank, num_shards=info.world_size, seed=config.seed)


def _build_parts(config: TrainConfig, info: DistributedInfo, num_classes: int,
                 amp_dtype: Optional[torch.dtype], *, pretrained: bool) -> Parts:
    """The adjoined model of ``config`` ready to train (prepare_network), its optimizer,
    gradient scaler, EMA and loss."""
    device = info.device
    an = prepare_network(create_adjoined_model(config, num_classes), config, info, amp_dtype,
                         pretrained=pretrained)
    if config.cuda_graphs and info.world_size > 1:
        raise ConfigError(f"--cuda-graphs captures one process's step; this run has {info.world_size} "
                          f"processes (DDP's all-reduce is not captured): leave --cuda-graphs out")
    return Parts(an=an, trained=an, optimizer=create_optimizer(an, config, device),
                 scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                 ema=AveragedModel(an, device=device, use_buffers=True) if config.ema else None,
                 loss_fn=_create_loss(config), lambda_schedule=get_lambda_schedule(config.lambda_schedule))


def prepare_network(an: torch.nn.Module, config: TrainConfig, info: DistributedInfo,
                    amp_dtype: Optional[torch.dtype], *, pretrained: bool) -> torch.nn.Module:
    """An adjoined network on the device: --pretrained weights (``pretrained``: a fresh
    start, not a resume), --sync-bn, --channels-last, its conv backends chosen and checked,
    --streams."""
    device = info.device
    if config.batch_size == 1:
        _check_one_image_batches(an, config.image_size)
    an = an.to(device)
    if config.pretrained is not None and pretrained:
        load_pretrained(an, config.pretrained, config.pretrained_skip_classifier)
    if config.sync_bn:
        an = convert_sync_batchnorm(an)
    if config.channels_last:
        an = an.to(memory_format=torch.channels_last)
    _check_backend(an, config, device, amp_dtype)
    prepare_backends(an, config.backend, config.batch_size, config.image_size, amp_dtype)
    if config.streams > 1:
        use_streams(an, config.streams)
    return an


def _restore(kind: "Training", parts: Parts, checkpoint: Optional[Dict[str, Any]],
             resume_path: Optional[Path], rank: int) -> Tuple[RunState, Optional[Dict[str, Any]]]:
    """The run's state, and this rank's RNG states to restore after a mid-epoch resume's
    replayed batches; a resumed run also gets its weights and optimizer states back."""
    if checkpoint is None:
        return RunState(), None
    try:
        parts.an.load_state_dict(checkpoint["model"])
    except RuntimeError as error:  # torch lists every mismatched key; the first says enough
        trained = {key: checkpoint["config"].get(key) for key in ("arch", "alpha", "policy", "arch_config")}
        raise ConfigError(f"--resume {resume_path}: its weights do not fit this network "
                          f"({(str(error).splitlines()[1:] or [str(error)])[0].strip()[:200]}); "
                          f"resume with the options it "
                          f"was trained with: {trained}") from None
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    if parts.ema is not None:
        if checkpoint["ema"] is None:
            raise ConfigError(f"--resume {resume_path}: the run was trained without --ema; "
                              f"resume it without --ema")
        parts.ema.load_state_dict(checkpoint["ema"])
    kind.load_extra_state(checkpoint, resume_path)
    state = RunState.from_checkpoint(checkpoint)
    rng = rank_rng_state(checkpoint, rank)
    if state.batches_done == 0:
        set_rng_state(rng)
    return state, rng


def _compile_mode(config: TrainConfig, info: DistributedInfo, kind: "Training", parts: Parts,
                  num_classes: int, amp_dtype: Optional[torch.dtype]) -> Optional[str]:
    """The torch.compile mode on this device (None: eager), after the eager warm-up that
    makes the backend decisions outside the compiler: a compiler failure is set-up too.
    (Before a resume loads its state: the warm-up leaves no trace, and the state it
    loads replaces anything the warm-up's forward added up.)"""
    mode, fallback = resolve_compile(compile_mode(config.compile), info.device)
    if fallback:
        _say(info, f"{kind.command}: {fallback}")
    if mode is not None:
        warm_up(parts.trained, functools.partial(parts.loss_fn, lambda_=1.0), batch_size=config.batch_size,
                image_size=config.image_size, num_classes=num_classes,
                channels_last=config.channels_last, amp_dtype=amp_dtype, device=info.device)
    return mode


def _open_run_dir(config: TrainConfig, kind: "Training", info: DistributedInfo,
                  lock: Optional[RunDirLock], resume_path: Optional[Path], state: RunState, data: Data,
                  schedule: Schedule) -> Tuple[TrainConfig, Optional[MetricsLog]]:
    """Set-up passed: rank 0 replaces an --overwrite run, writes its config and opens the
    metrics log. Returns the config as saved (--arch-config pointing at the run's own copy)
    and the log (None on the other ranks)."""
    # The run keeps its own copy of --arch-config, so eval, export and resume find it from
    # any working directory (read now: --overwrite may be about to delete the old copy).
    arch_config_text = Path(config.arch_config).read_text() if config.arch_config else None
    if not info.is_main:
        return config, None
    run_dir = Path(config.out)
    checkpoint_dir = run_dir / "checkpoints"
    if lock is not None:
        lock.remove_previous_run()  # --overwrite: set-up passed, the old run may go now
    run_dir.mkdir(parents=True, exist_ok=True)
    _set_aside_unusable_last(config, resume_path, checkpoint_dir, info, kind.command)
    if arch_config_text is not None:
        arch_copy = run_dir / ARCH_CONFIG_COPY
        if not arch_copy.is_file() or arch_copy.read_text() != arch_config_text:
            write_text_atomically(arch_copy, arch_config_text)
        config = dataclasses.replace(config, arch_config=str(arch_copy.resolve()))
    remove_stale_temp_files(checkpoint_dir)
    remove_stale_temp_files(run_dir)  # of config.yaml, summary.json, ... (write_text_atomically)
    kind.write_config(config, run_dir)  # write_text_atomically: a full disk names the file
    with reporting_full_disk(run_dir / "metrics.jsonl", len(json.dumps(state.history))):
        log = MetricsLog(run_dir, state.history)
    _say(info, kind.describe(config, info, data, schedule)
               + (f"; resuming from {resume_path} at epoch {state.epoch + 1}" if resume_path else ""))
    return config, log


def _training_model(config: TrainConfig, info: DistributedInfo, trained: torch.nn.Module,
                    mode: Optional[str], schedule: Schedule, find_unused_parameters: bool
                    ) -> torch.nn.Module:
    """What the steps call: ``trained`` under DDP (torchrun), with --teacher, torch.compiled.
    ``find_unused_parameters``: some parameter may get no gradient in a step."""
    device = info.device
    # Gradients as views of DDP's buckets: no copy between them. static_graph lets DDP
    # skip per-iteration bookkeeping (every parameter is used every step), but not
    # under torch.compile, whose DDPOptimizer does not support it (pytorch#109261), nor
    # with --accum-steps: its no_sync micro-batches fail the static graph's reducer
    # ("expect_autograd_hooks_ INTERNAL ASSERT FAILED", seen on 2 gloo ranks).
    static_graph = mode is None and schedule.accum_steps == 1 and not find_unused_parameters
    model = DistributedDataParallel(trained, device_ids=[device] if device.type == "cuda" else None,
                                    gradient_as_bucket_view=True, static_graph=static_graph,
                                    find_unused_parameters=find_unused_parameters
                                    ) if info.enabled else trained
    if config.teacher is not None:
        model = WithTeacher(model, _load_teacher(config.teacher, device))
    if mode is not None:
        model = torch.compile(model, mode=mode)
    return model


class Stepper:
    """The run's optimizer step: ``train_step``, or under --cuda-graphs its capture (made on
    the first batch, replayed from then on; what changes between steps lives on the device,
    see anfast.train.graphs). Both add to one StepMeter, whose sums ``start_epoch`` restarts
    in the same device tensor (a captured step keeps writing the tensor it was captured with)."""

    def __init__(self, run: Run, state: RunState) -> None:
        device, parts = run.info.device, run.parts
        self.run = run
        self.meter = StepMeter(device, max_bad_steps=run.config.max_bad_steps, **state.meter_sums())
        self.parameters = [p for p in parts.an.parameters() if p.requires_grad]
        self.update_ema = (functools.partial(ema_update, parts.ema, parts.an, decay=run.config.ema_decay)
                           if parts.ema is not None else None)
        self.captured_step: Optional[CapturedStep] = None
        self.lambda_on_device = torch.zeros((), device=device) if run.config.cuda_graphs else None
        if run.config.cuda_graphs:
            tensor_learning_rates(parts.optimizer, device)
        self.graph_skips_reported = 0  # compiled graphs that reduce-overhead ran without a CUDA graph
        self.loss_fn: Optional[Callable] = None

    def start_epoch(self, lambda_: float, state: RunState) -> None:
        """Take this epoch's distillation weight and the sums the epoch starts from."""
        if self.lambda_on_device is not None:
            self.lambda_on_device.fill_(lambda_)
        weight = self.lambda_on_device if self.lambda_on_device is not None else lambda_
        self.loss_fn = functools.partial(self.run.parts.loss_fn, lambda_=weight)
        self.meter.restart(**state.meter_sums())
        self.run.kind.start_epoch(state)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 more_batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], micro_batches: int,
                 step: int) -> None:
        """Optimizer step ``step`` on ``images, labels`` and ``more_batches`` (micro_batches in all)."""
        run, parts = self.run, self.run.parts
        more_optimizers = run.kind.before_step(run, step)
        options = dict(loss_fn=self.loss_fn, optimizer=parts.optimizer, scaler=parts.scaler,
                       parameters=self.parameters, amp_dtype=run.amp_dtype,
                       clip_grad=run.config.clip_grad, update_ema=self.update_ema, meter=self.meter)
        if not run.config.cuda_graphs:
            train_step(run.model, images, labels, **options, more_batches=more_batches,
                       accumulate=micro_batches, more_optimizers=more_optimizers)
            return
        if self.captured_step is None:
            self.captured_step = CapturedStep(functools.partial(train_step, run.model, **options),
                                              images, labels,
                                              state=functools.partial(step_state_tensors, parts.an,
                                                                      parts.optimizer, parts.ema,
                                                                      self.meter))
        self.captured_step(images, labels)

    def report_graph_skips(self) -> None:
        """Say once per new count when reduce-overhead ran compiled graphs without CUDA graphs."""
        skips = cudagraph_skips()
        if self.run.compile_mode == "reduce-overhead" and skips > self.graph_skips_reported:
            _say(self.run.info, f"{self.run.kind.command}: torch.compile reduce-overhead ran {skips} "
                                f"compiled graph(s) without CUDA graphs (inductor skips a graph that "
                                f"mutates its inputs, BatchNorm's running statistics among them; "
                                f"TORCH_LOGS=perf_hints says why); --cuda-graphs captures the whole eager "
                                f"step instead")
            self.graph_skips_reported = skips


def _train_epoch(run: Run, state: RunState, stepper: Stepper, lambda_: float, epoch_start: float,
                 resume_rng: Optional[Dict[str, Any]]) -> bool:
    """Train the rest of epoch ``state.epoch``; False when a stop request ended it early.

    The steps never read the device; the StepMeter is read every --log-interval steps and
    at the end (``_read_meter``).
    """
    config, schedule, epoch = run.config, run.schedule, state.epoch
    stepper.start_epoch(lambda_, state)
    train_loader = run.data.train_loader
    train_loader.set_epoch(epoch)
    run.model.train()
    bar = tqdm(total=schedule.steps_per_epoch, initial=math.ceil(state.batches_done / schedule.accum_steps),
               desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=None if run.info.is_main else True)
    stopped = False
    batches = enumerate(train_loader)
    for batch_index, (images, labels) in batches:
        # A run resumed mid-epoch replays the loader to where it stopped and restores
        # the RNGs after the last replayed batch, so the remaining batches and random
        # draws are those of an uninterrupted run.
        if batch_index < state.batches_done:
            if batch_index == state.batches_done - 1:
                set_rng_state(resume_rng)
            continue
        lr = schedule.lr(state.step)
        set_learning_rate(run.parts.optimizer, lr)
        micro_batches = min(schedule.accum_steps, schedule.batches_per_epoch - batch_index)
        images_seen = [labels.numel()]
        stepper(images, labels, _more_batches(batches, micro_batches - 1, images_seen), micro_batches,
                state.step)
        state.step += 1
        state.batches_done = batch_index + micro_batches
        state.epoch_images += sum(images_seen) * run.info.world_size
        bar.update(1)
        # Ranks must agree, or one would wait forever in the next all-reduce.
        if any_rank_on_host(_stop_requested(run, state.step), run.host_group):
            stopped = True
            break
        if state.step % config.log_interval == 0:
            values = _read_meter(run, state, stepper.meter)
            if values["recent_loss"] is not None:
                bar.set_postfix(loss=f"{values['recent_loss']:.3f}",
                                grad_norm=f"{values['recent_grad_norm']:.3g}",
                                lr=f"{lr:.3g}", bad_steps=values["bad_steps"])
    bar.close()
    _read_meter(run, state, stepper.meter)  # at the epoch's end or a stop
    stepper.report_graph_skips()
    if run.info.device.type == "cuda":
        torch.cuda.synchronize(run.info.device)
    state.epoch_seconds = time.perf_counter() - epoch_start
    return not stopped


def _more_batches(batches: Iterator, count: int, seen: List[int]):
    """A step's further ``count`` micro-batches, drawn from the epoch's iterator one at a
    time; each one's number of images is appended to ``seen``."""
    for _ in range(count):
        _, (images, labels) = next(batches)
        seen.append(labels.numel())
        yield images, labels


def _stop_requested(run: Run, step: int) -> bool:
    """SIGTERM / SIGINT, or fit's ``should_stop(step)``, polled after every step."""
    return run.stop_signal.requested or bool(run.should_stop and run.should_stop(step))


def _read_meter(run: Run, state: RunState, meter: StepMeter) -> Dict[str, Any]:
    """The one host read: the sums into ``state``; stop if too many steps were bad."""
    values = meter.read()
    state.take_meter_read(values)
    failed_at = values["failed_at"]
    if failed_at is not None:
        last = run.checkpoint_dir / "last.pt"
        where = (f"the last good checkpoint is {last}" if last.is_file()
                 else "no checkpoint has been written yet")
        raise NonFiniteLossError(
            f"step {failed_at} (epoch {(failed_at - 1) // run.schedule.steps_per_epoch + 1}): "
            f"the loss or the gradient norm is not finite; the step was skipped, "
            f"{values['bad_steps']} bad step(s) so far, more than --max-bad-steps "
            f"{run.config.max_bad_steps}; {where}. Lower --lr, set --clip-grad, use --amp "
            f"fp16 / off, or allow skipped steps with --max-bad-steps")
    return values


def _checkpoint(run: Run, state: RunState) -> Optional[Dict[str, Any]]:
    """Everything a resumed run needs (the state's wall time counts this process's so far),
    on rank 0; None on the others. Every rank must call it: it gathers each rank's RNG
    states (rank_rng_state), the rest is rank 0's."""
    rng = gather_on_main(get_rng_state(), run.host_group)
    if not run.info.is_main:
        return None
    parts = run.parts
    return {"model": parts.an.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict(), "ema": parts.ema.state_dict() if parts.ema else None,
            "rng": rng, "config": run.config.to_dict(),
            "classes": list(run.data.train_loader.classes),
            "batches_per_epoch": run.schedule.batches_per_epoch, "teacher_sha256": run.teacher_sha256,
            **run.kind.extra_state(),
            **state.to_checkpoint(), "wall_time_s": _wall_time(run, state)}


def _wall_time(run: Run, state: RunState) -> float:
    """Seconds the run has taken: its earlier processes' and this one's so far."""
    return state.wall_time_s + time.perf_counter() - run.started


def _save_stopped_run(run: Run, state: RunState) -> Dict[str, Any]:
    """A stop request ended the run between two steps: save last.pt (rank 0) and say how to go on."""
    last = run.checkpoint_dir / "last.pt"
    checkpoint = _checkpoint(run, state)
    if run.info.is_main:
        save_checkpoint(checkpoint, last, keep_previous=True)
        run.log.close()
        where = (f"after epoch {state.epoch}" if state.batches_done == 0
                 else f"at epoch {state.epoch + 1}")
        _say(run.info, f"stopped {where}, step {state.step}; saved {last} (continue with --resume auto)")
    barrier()
    return {"interrupted": True, "epoch": state.epoch, "step": state.step, "checkpoint": str(last)}


def _end_epoch(run: Run, state: RunState, lambda_: float, epoch_start: float) -> None:
    """Log the epoch's row (the run kind's: for `anfast train` the base and every student
    evaluated), save last.pt (and best.pt for the best student so far)."""
    info, kind = run.info, run.kind
    row = kind.epoch_row(run, state, lambda_, epoch_start)
    is_best = state.finish_epoch(row)
    checkpoint = _checkpoint(run, state)
    if info.is_main:
        with reporting_full_disk(run.log.path, len(json.dumps(row)) + 1):
            run.log.log(row)
        _say(info, kind.epoch_message(run.config, state, row))
        save_checkpoint(checkpoint, run.checkpoint_dir / "last.pt", keep_previous=True)
        if is_best:
            save_checkpoint(checkpoint, run.checkpoint_dir / "best.pt")
    barrier()


class Training:
    """The kind of run `anfast train` is: what fit's engine trains and how the run reports.

    The engine (set-up order, the steps, stops, checkpoints, resume, the run directory)
    is fit's; a kind says which data and network, what a checkpoint holds beyond the
    engine's, what happens around each step, and what each epoch and the end write.
    anfast.dan.search.Search is the other kind: a DAN search.
    """

    command = "anfast train"         # how the run's messages begin
    artifacts = TRAIN_ARTIFACTS      # what --overwrite removes (rundir.claim_run_dir)
    find_unused_parameters = False   # DDP: every parameter gets a gradient in every step
    keep_options = KEEP_THE_RUNS_OPTIONS  # a refused --resume's advice on the run's options

    def check_resumed(self, checkpoint: Dict[str, Any], resume_path: Path) -> None:
        """Refuse a checkpoint of another kind of run before any of it is read (its options
        or weights would be refused with advice that cannot help)."""
        if checkpoint.get("search_config") is not None:
            raise ConfigError(f"--resume {resume_path}: a checkpoint of `anfast search`, not of "
                              f"`anfast train`; continue that search with `anfast search ... "
                              f"--resume auto`, or train the network it found with `anfast train "
                              f"--arch-config RUN/arch.json` in another --out")

    def open_data(self, config: TrainConfig, info: DistributedInfo, checkpoint: Optional[Dict[str, Any]],
                  resume_path: Optional[Path]) -> Data:
        """The train and val loaders, checked against each other and the resumed run."""
        return _open_data(config, info, checkpoint, resume_path)

    def build(self, config: TrainConfig, info: DistributedInfo, data: Data,
              amp_dtype: Optional[torch.dtype], *, pretrained: bool) -> Parts:
        """The network and what trains it (``pretrained``: a fresh start, not a resume)."""
        return _build_parts(config, info, len(data.train_loader.classes), amp_dtype, pretrained=pretrained)

    def extra_state(self) -> Dict[str, Any]:
        """What a checkpoint holds beyond the engine's (weights, optimizer, RunState, ...)."""
        return {}

    def load_extra_state(self, checkpoint: Dict[str, Any], resume_path: Path) -> None:
        """Take ``extra_state`` back from a resumed checkpoint."""

    def write_config(self, config: TrainConfig, run_dir: Path) -> None:
        """The resolved options next to the run: config.yaml (loadable with --config)."""
        save_config(config, run_dir / "config.yaml")

    def describe(self, config: TrainConfig, info: DistributedInfo, data: Data, schedule: Schedule) -> str:
        """The line that says set-up is done and the steps begin."""
        train_loader, accum = data.train_loader, schedule.accum_steps
        widths = ("widths " + Path(config.arch_config).name if config.arch_config
                  else "alpha " + ",".join(f"{a:g}" for a in config.alpha))
        return (f"{self.command}: {config.arch}, {widths}, "
                f"{len(train_loader.classes)} classes, {train_loader.num_samples * info.world_size} train "
                f"images, {schedule.steps_per_epoch} steps/epoch"
                + (f" of {min(accum, schedule.batches_per_epoch)} micro-batches (effective batch "
                   f"{schedule.effective_batch})" if accum > 1 else "")
                + f", device {info.device}, world size {info.world_size}, {train_loader.reason}")

    def start_epoch(self, state: RunState) -> None:
        """Called before the steps of epoch ``state.epoch`` (also when a resume joins it mid-way)."""

    def before_step(self, run: Run, step: int) -> Sequence[torch.optim.Optimizer]:
        """Called before optimizer step ``step``; returns the optimizers the step takes
        beside ``parts.optimizer``. No host read of the device here."""
        return ()

    def training_row(self, run: Run, state: RunState, lambda_: float, epoch_start: float) -> Dict[str, Any]:
        """The epoch's training numbers, from the StepMeter's sums in ``state``."""
        return {"epoch": state.epoch, "step": state.step, "lr": run.schedule.lr(state.step - 1),
                "lambda": lambda_, "train_loss": state.mean_epoch_loss(),
                "grad_norm": state.mean_epoch_grad_norm(), "bad_steps": state.bad_steps,
                "images_per_second": state.epoch_images / state.epoch_seconds,
                "epoch_seconds": time.perf_counter() - epoch_start}

    def epoch_row(self, run: Run, state: RunState, lambda_: float, epoch_start: float) -> Dict[str, Any]:
        """metrics.jsonl's row of the finished epoch: the base and every student evaluated."""
        info = run.info
        if info.enabled:
            # Rank 0's BatchNorm statistics on every rank: in the trained model (a resume
            # loads rank 0's) and in the EMA, which each rank averaged from its own batches'
            # statistics and which is what is evaluated, saved and exported.
            broadcast_buffers(run.parts.an)
            if run.eval_model is not run.parts.an:
                broadcast_buffers(run.eval_model)
        # Under --arch-config each width group has its own alpha: the students go unlabelled
        # (summary.json's "alpha" is null), not labelled with --alpha, which they never used.
        alphas = () if run.config.arch_config else list(run.config.alpha)
        metrics = evaluate(run.eval_model, run.data.val_loader, info.device, amp_dtype=run.amp_dtype,
                           show_progress=info.is_main, alphas=alphas)
        return {**self.training_row(run, state, lambda_, epoch_start),
                "base": metrics["base"], "students": metrics["students"], "student": metrics["students"][0],
                "skipped_images": _skipped(run.data.train_loader, run.data.val_loader, info.device)}

    def epoch_message(self, config: TrainConfig, state: RunState, row: Dict[str, Any]) -> str:
        """The log line of the epoch ``row`` (``state`` has counted it)."""
        return (f"epoch {state.epoch}/{config.epochs}  loss {row['train_loss']:.4f}  "
                f"base top-1 {100 * row['base']['top1']:.2f}%  student top-1 "
                f"{100 * row['student']['top1']:.2f}%  lambda {row['lambda']:.3f}  "
                f"{row['images_per_second']:.0f} img/s")

    def finish(self, run: Run, state: RunState) -> Dict[str, Any]:
        """The last epoch is done: summary.json, curves, the tradeoff plot and the exports;
        returns the summary."""
        config, info, run_dir = run.config, run.info, run.run_dir
        state.wall_time_s = _wall_time(run, state)
        alphas = list(config.alpha)
        costs = network_costs(run.eval_model, config.image_size)
        summary = _summary(config, state, run.eval_model, costs, alphas, run.data.train_loader, info.device,
                           info, run.amp_dtype)
        if info.is_main:
            run.log.close()
            plot_curves(state.history, run_dir / "curves.png")
            plot_tradeoff(summary, costs, run_dir / "tradeoff.png",
                          f"{config.arch}, {config.image_size} px, epoch {config.epochs}")
            export_networks(run.eval_model, run_dir, len(alphas))
            summary_text = json.dumps(summary, indent=2) + "\n"
            write_text_atomically(run_dir / "summary.json", summary_text)
            _say(info, format_table(summary, costs))
            _say(info, f"done in {summary['wall_time_s']:.0f} s: base top-1 "
                       f"{100 * summary['base']['top1']:.2f}%, student top-1 "
                       f"{100 * summary['student']['top1']:.2f}%; run directory {run_dir}")
        barrier()
        return summary


def _create_loss(config: TrainConfig) -> torch.nn.Module:
    """--objective adjoined: the paper's loss; base / student: one side alone (OneNetworkLoss)."""
    if config.objective == "adjoined":
        return AdjoinedLoss(label_smoothing=config.label_smoothing)
    return OneNetworkLoss(config.objective, label_smoothing=config.label_smoothing,
                          temperature=config.distill_temperature, distill_weight=config.distill_weight)


class WithTeacher(torch.nn.Module):
    """The trained network's output next to a frozen teacher's logits (--teacher)."""

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> TaughtOutput:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return TaughtOutput(self.model(images), teacher_logits)

    def train(self, mode: bool = True) -> "WithTeacher":
        """The loop's model.train() each epoch trains the model; the teacher stays in eval."""
        self.model.train(mode)
        self.teacher.eval()
        return self


def _load_teacher(path: str, device: torch.device) -> torch.nn.Module:
    """An export folder in eval mode with no gradients: its BatchNorm statistics stay fixed."""
    teacher = load_student(path).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def data_root(config: TrainConfig, info: DistributedInfo) -> Path:
    """--data, or the built-in set (generated once, by rank 0, while the others wait)."""
    if config.data is not None:
        return Path(config.data)
    if info.is_main:
        root = builtin_dataset()
    barrier()
    return root if info.is_main else builtin_dataset()


def _synthetic_loaders(config: TrainConfig, info: DistributedInfo):
    """--data synthetic: a training batch and a one-step validation batch, made on the device.

    Validation runs on a second random batch: it exercises the evaluation path and its
    accuracy is chance (1 / num_classes) by construction, so read only the throughput.
    """
    options = dict(batch_size=config.batch_size, image_size=config.image_size,
                   num_classes=config.num_classes or DEFAULT_SYNTHETIC_CLASSES,
                   device=info.device, channels_last=config.channels_last, shard_id=info.rank)
    return (SyntheticLoader(steps=config.synthetic_steps, seed=config.seed, **options),
            SyntheticLoader(steps=1, seed=config.seed + 1, **options))


def _skipped(train_loader, val_loader, device: torch.device) -> int:
    """Unreadable files skipped so far by this run's loaders, summed over ranks."""
    return int(all_reduce_sum([train_loader.skipped + val_loader.skipped], device)[0])


def _summary(config: TrainConfig, state: RunState, eval_model: torch.nn.Module, costs,
             alphas, train_loader, device: torch.device, info: DistributedInfo,
             amp_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """summary.json: final metrics of every network, their size and cost (``costs``:
    network_costs of ``eval_model``), throughput, and the conv backend each layer ran."""
    final = state.history[-1]
    input_size = (1, 3, config.image_size, config.image_size)
    base_profile, student_profiles = costs[0], costs[1:]
    pick = lambda row: {key: row[key] for key in ("top1", "top5", "loss")}  # noqa: E731
    # Under --arch-config each width group has its own alpha: no single number applies.
    alphas = [None] * len(alphas) if config.arch_config else alphas
    return {
        "base": pick(final["base"]),
        "student": {**pick(final["student"]), "alpha": alphas[0]},
        "students": [{**pick(row), "alpha": alpha} for row, alpha in zip(final["students"], alphas)],
        "arch_config": config.arch_config,
        "best_student_top1": state.best_student_top1,
        "params": {"base": base_profile["params"], "student": student_profiles[0]["params"],
                   "students": [p["params"] for p in student_profiles]},
        "flops": {"base": base_profile["flops"], "student": student_profiles[0]["flops"],
                  "students": [p["flops"] for p in student_profiles],
                  "input_size": list(input_size)},
        "images_per_second": state.train_images / max(state.train_seconds, 1e-9),
        "wall_time_s": state.wall_time_s,
        "epochs": config.epochs,
        "steps": state.step,
        "effective_batch_size": _effective_batch(config, len(train_loader), info.world_size),
        "bad_steps": state.bad_steps,
        "skipped_images": final["skipped_images"],
        "loader": train_loader.name,
        "device": str(device),
        "world_size": info.world_size,
        "ema": config.ema,
        "backends": layer_backends(eval_model, config.batch_size, config.image_size, amp_dtype),
        "streams": config.streams,
        "cuda_graphs": _cuda_graphs_summary(config, device),
    }


def _cuda_graphs_summary(config: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """How the run used CUDA graphs: the whole captured step, inductor's (with the number
    of compiled graphs it ran without one), or none."""
    mode, _ = resolve_compile(compile_mode(config.compile), device)
    if config.cuda_graphs:
        return {"mode": "whole step (--cuda-graphs)", "graphs_skipped": 0}
    if mode == "reduce-overhead":
        return {"mode": "torch.compile reduce-overhead", "graphs_skipped": cudagraph_skips()}
    return {"mode": "off", "graphs_skipped": 0}


def _say(info: DistributedInfo, message: str) -> None:
    """One line of the run's log, flushed at once: a pipe (`| tee`, a supervisor waiting
    for "set-up done") must not see it only when the block buffer fills at the end."""
    if info.is_main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
