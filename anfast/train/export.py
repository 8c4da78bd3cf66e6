"""A finished run's networks: exports to safetensors + JSON (and ONNX), and re-evaluation.

``anfast export`` and ``anfast eval`` rebuild the adjoined model from the run's
config.yaml and load a checkpoint (its EMA weights when the run used --ema), so
they see exactly the network that training evaluated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.optim.swa_utils import AveragedModel

from anfast import export as exporting
from anfast.export import export_base, export_student
from anfast.runs.checkpoint import (CheckpointError, load_training_checkpoint, newest_usable_checkpoint,
                                    reporting_full_disk, tensor_bytes, write_text_atomically)
from anfast.train.config import SYNTHETIC_DATA, ConfigError, TrainConfig, check_field_types, load_config

__all__ = ["export_networks", "load_run", "checkpoint_path", "evaluate_run", "export_run",
           "ARCH_CONFIG_COPY"]

# `anfast train --arch-config FILE` keeps a copy of FILE in RUN_DIR under this name.
ARCH_CONFIG_COPY = "arch_config.json"


def export_networks(an: torch.nn.Module, run_dir: Path, num_students: int) -> Dict[str, Path]:
    """Write base/, student/ and, for nested students, student_1/, student_2/, ...; a full
    disk is a DiskFullError naming the folder and the space it needs."""
    networks = {"base": export_base(an)}
    for index in range(num_students):
        networks["student" if index == 0 else f"student_{index}"] = export_student(an, index=index)
    written = {}
    for name, network in networks.items():
        with reporting_full_disk(run_dir / name, tensor_bytes(network.state_dict())):
            written[name] = exporting.save_exported(network, run_dir / name)
    return written


def load_run(run_dir: Union[str, Path], checkpoint: str = "best",
             device: Union[str, torch.device] = "cpu") -> Tuple[TrainConfig, torch.nn.Module, Dict[str, Any]]:
    """(config, adjoined model in eval mode with the checkpoint's weights, checkpoint)."""
    from anfast.train.build import create_adjoined_model

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    if config.arch_config is not None and (run_dir / ARCH_CONFIG_COPY).is_file():
        # The run's own copy of its --arch-config: found from any working directory.
        config = dataclasses.replace(config, arch_config=str(run_dir / ARCH_CONFIG_COPY))
    path = checkpoint_path(run_dir, checkpoint)
    try:
        state = load_training_checkpoint(path, map_location=device)
    except CheckpointError as error:
        raise _damaged_checkpoint(run_dir, path, error) from None
    if state.get("search_config") is not None:  # its weights are a gated supernet's
        raise ConfigError(f"{run_dir} is an `anfast search` run: what it found is {run_dir / 'arch.json'}; "
                          f"train that network (`anfast train --arch-config {run_dir / 'arch.json'} ...`, "
                          f"as the search printed), then evaluate or export that run")
    an = create_adjoined_model(config, len(state["classes"])).to(device)
    if state["ema"] is not None:
        ema = AveragedModel(an, use_buffers=True)
        ema.load_state_dict(state["ema"])
        an = ema.module
    else:
        an.load_state_dict(state["model"])
    return config, an.eval(), state


def checkpoint_path(run_dir: Union[str, Path], checkpoint: str = "best") -> Path:
    """RUN_DIR/checkpoints/{checkpoint}.pt; "best" falls back to last.pt while a run has
    no best yet (it stopped before its first evaluation). Raises ConfigError when neither exists."""
    checkpoints = Path(run_dir) / "checkpoints"
    path = checkpoints / f"{checkpoint}.pt"
    if not path.is_file() and checkpoint == "best":
        path = checkpoints / "last.pt"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint ({checkpoints}/{checkpoint}.pt does not exist); "
                          f"the run stopped before saving one: continue it with "
                          f"`anfast train --out {run_dir} --resume auto`")
    return path


def evaluate_run(run_dir: Union[str, Path], *, data: Optional[str] = None,
                 checkpoint: str = "best", batch_size: Optional[int] = None,
                 workers: Optional[int] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate a run's base and students on ``data``/val; print a table, write eval.json."""
    from anfast.data import builtin_dataset, create_loader
    from anfast.train.build import resolve_amp_dtype
    from anfast.runs.distributed import resolve_device
    from anfast.train.evaluate import evaluate, format_table, network_costs

    run_dir = Path(run_dir)
    for name, value, least in (("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{name} {value} must be >= {least}")
    resolved = resolve_device(device or "auto")
    config, an, state = load_run(run_dir, checkpoint, resolved)
    if data is None and config.data == SYNTHETIC_DATA:
        raise ConfigError(f"{run_dir} trained on --data synthetic (random images, no val set); "
                          f"pass --data with a folder of val/<class>/ images of its "
                          f"{len(state['classes'])} classes")
    data_root = Path(data or config.data or builtin_dataset())
    if not data_root.is_dir():
        raise ConfigError(f"--data {data_root}: no such directory")
    loader = create_loader(data_root, "val", batch_size=batch_size or config.batch_size,
                           image_size=config.image_size, loader=config.loader,
                           workers=config.workers if workers is None else workers,
                           device=resolved, channels_last=config.channels_last)
    if list(loader.classes) != list(state["classes"]):
        raise ConfigError(f"{data_root}/val classes {list(loader.classes)[:5]}... differ from the "
                          f"run's {list(state['classes'])[:5]}...; evaluate on data with the "
                          f"training classes")
    if config.channels_last:
        an = an.to(memory_format=torch.channels_last)
    amp = config.amp
    if amp == "fp16" and resolved.type != "cuda":
        # Training refuses fp16 off CUDA for its GradScaler; evaluation needs none, and the
        # fp32 numbers of the same weights are what the user asked for on this device.
        print(f"anfast eval: {run_dir} trained with --amp fp16, whose autocast runs on CUDA only; "
              f"evaluating on {resolved} in fp32", flush=True)
        amp = "off"
    metrics = evaluate(an, loader, resolved, amp_dtype=resolve_amp_dtype(amp, resolved),
                       show_progress=True, alphas=() if config.arch_config else config.alpha)
    metrics.update({"checkpoint": checkpoint_path(run_dir, checkpoint).stem, "epoch": state["epoch"],
                    "data": str(data_root),
                    "skipped_images": loader.skipped})
    print(format_table(metrics, network_costs(an, config.image_size)))
    text = json.dumps(metrics, indent=2) + "\n"
    write_text_atomically(run_dir / "eval.json", text)
    return metrics


def export_run(run_dir: Union[str, Path], *, checkpoint: str = "best",
               onnx: bool = False) -> Dict[str, Path]:
    """Re-export a run's networks from a checkpoint; with ``onnx`` also student.onnx."""
    if onnx and importlib.util.find_spec("onnx") is None:
        raise ImportError("--onnx needs the onnx package: pip install onnx")
    run_dir = Path(run_dir)
    config, an, _ = load_run(run_dir, checkpoint)
    written = export_networks(an, run_dir, len(config.alpha))
    if onnx:
        student = export_student(an, index=0).eval()
        path = written["student"] / "student.onnx"
        example = torch.randn(1, 3, config.image_size, config.image_size)
        # dynamo=False: the torch.export-based exporter also needs onnxscript, which
        # the onnx extra does not install; the TorchScript exporter handles plain CNNs.
        torch.onnx.export(student, (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        written["onnx"] = path
    return written


def _run_config(run_dir: Path) -> TrainConfig:
    """RUN_DIR/config.yaml as a TrainConfig; an edited file that is no longer one (bad YAML,
    unknown options, values of the wrong type) is a ConfigError naming it."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; pass a run directory written by "
                                f"`anfast train`")
    try:
        config = TrainConfig.from_dict(load_config(str(path)))
        check_field_types(config, ConfigError)
    except (ConfigError, TypeError) as error:
        if str(error).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {error}; restore the file `anfast train` wrote") from None
    return config


def _damaged_checkpoint(run_dir: Path, path: Path, error: CheckpointError) -> CheckpointError:
    """``error`` for ``path`` with the advice eval and export can follow: the run's usable
    checkpoint to pass instead (never --overwrite, which would delete the run)."""
    usable, _ = newest_usable_checkpoint(path.parent)
    if usable is not None and usable.stem in ("best", "last"):
        fix = f"{usable} is intact: pass --checkpoint {usable.stem}"
    elif usable is not None:
        fix = (f"{usable} is intact: continue the run from it with "
               f"`anfast train --out {run_dir} --resume auto`, then pass --checkpoint last")
    else:
        fix = f"no checkpoint of {path.parent} loads; retrain the run in another --out"
    return CheckpointError(f"{path} is {error.reason}; {fix}", reason=error.reason)
