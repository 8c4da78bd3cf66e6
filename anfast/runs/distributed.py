"""torchrun support: process group from the environment, rank-0 helpers, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistributedInfo", "init_distributed", "resolve_device", "all_reduce_sum",
           "any_rank", "create_host_group", "any_rank_on_host", "gather_on_main", "barrier",
           "broadcast_buffers", "destroy_distributed"]


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's GPU when CUDA is available, else the CPU."""
    from anfast.runs.errors import ConfigError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: anfast trains on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; "
                              f"use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), numbered from 0")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str) -> DistributedInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=resolved if backend == "nccl" else None)
    return DistributedInfo(rank, local_rank, world_size, resolved)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list:
    """Sum float values over ranks (in float64, so counts stay exact); identity alone."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flags: Sequence[bool], device: torch.device) -> list:
    """Each flag true on every rank when it is true on any (one all-reduce for all)."""
    if not dist.is_initialized():
        return [bool(flag) for flag in flags]
    return [total > 0 for total in all_reduce_sum([float(flag) for flag in flags], device)]


def create_host_group():
    """A gloo group for votes between the ranks' hosts (None when not distributed).

    Its collectives take CPU tensors, so they never wait for a GPU's queued work; the
    default group serves when it is gloo already (CPU runs). Every rank must call this.
    """
    if not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def any_rank_on_host(flag: bool, group) -> bool:
    """True on every rank when ``flag`` is true on any, agreed over ``create_host_group()``."""
    if group is None:
        return bool(flag)
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, group=group)
    return bool(tensor.item())


def gather_on_main(value: Any, group) -> Optional[List[Any]]:
    """Every rank's ``value`` (tensors and plain values) on rank 0, listed by rank, sent
    over ``create_host_group()``; None on the other ranks, [value] alone. Every rank must
    call this."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0, group=group)
    return gathered


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all ranks evaluate one model."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
