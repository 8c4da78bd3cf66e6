"""What a run is made of: the adjoined model, the optimizer, the AMP dtype.

Each ``create_*`` raises ConfigError naming the option and the fix, so ``fit`` can
build everything before the first step and fail there, not an hour in.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import torch

from anfast.adjoin import adjoin
from anfast.models import resolve_arch
from anfast.train.config import ConfigError, TrainConfig, load_arch_config

__all__ = ["create_adjoined_model", "create_optimizer", "resolve_amp_dtype", "has_apex",
           "check_environment"]


@functools.lru_cache(maxsize=None)
def has_apex() -> bool:
    """True when apex's fused optimizers (CUDA extensions) are importable."""
    try:
        from apex.optimizers import FusedLAMB, FusedSGD  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision.

    "auto" is bf16 on CUDA and off on the CPU: bf16 matmuls on a CPU without AMX or
    AVX512-BF16 run slower than fp32.
    """
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"--amp fp16 needs CUDA (its loss scaling is a GPU feature) and the "
                          f"device is {device}; use --amp bf16 or --amp off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def check_environment(config: TrainConfig, device: torch.device) -> None:
    """Options that depend on this machine rather than on the data, and the --arch name."""
    check_arch(config.arch)
    if config.optimizer == "lamb":
        if not has_apex():
            raise ConfigError("--optimizer lamb uses NVIDIA apex's FusedLAMB, and apex is not "
                              "importable: install apex with its CUDA extensions "
                              "(https://github.com/NVIDIA/apex#installation), or use "
                              "--optimizer adamw")
        if device.type != "cuda":
            raise ConfigError(f"--optimizer lamb (apex FusedLAMB) runs on CUDA only and the "
                              f"device is {device}; use --optimizer adamw")
    if config.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"--cuda-graphs captures the step on a CUDA device and the device is "
                          f"{device}; leave --cuda-graphs out")
    if config.sync_bn and device.type != "cuda":
        raise ConfigError(f"--sync-bn needs CUDA (SyncBatchNorm) and the device is {device}; "
                          f"leave --sync-bn out")
    resolve_amp_dtype(config.amp, device)


def check_arch(arch: str) -> None:
    """Refuse an --arch name no registry knows, before any data is read (a DALI loader
    scans every image first)."""
    try:
        resolve_arch(arch)
    except ValueError as error:
        raise ConfigError(f"--arch {error}") from None


def create_adjoined_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """``config.arch`` (torchvision, anfast or timm:NAME), ``num_classes`` outputs, adjoined."""
    check_arch(config.arch)
    alphas = tuple(int(a) if float(a).is_integer() else a for a in config.alpha)
    alpha = alphas[0] if len(alphas) == 1 else alphas
    input_size = (3, config.image_size, config.image_size)
    try:
        policy = config.policy
        if config.arch_config:
            policy = _arch_config_policy(config.arch, num_classes,
                                         load_arch_config(config.arch_config), config.round_to,
                                         input_size)
        # By name, so exports record the source and load_student rebuilds it.
        return adjoin(config.arch, alpha=alpha, policy=policy, round_to=config.round_to,
                      input_size=input_size, num_classes=num_classes)
    except ConfigError:  # already names the option and the fix (_arch_config_policy)
        raise
    except (ValueError, TypeError, NotImplementedError) as error:
        widths = (f"--arch-config {config.arch_config}" if config.arch_config
                  else f"--alpha {','.join(f'{a:g}' for a in config.alpha)}")
        raise ConfigError(f"cannot adjoin --arch {config.arch} with {widths}: {error}") from error


def _arch_config_policy(arch: str, num_classes: int, group_alphas: Dict[str, float],
                        round_to: int, input_size) -> Dict[str, float]:
    """DAN's {width group: alpha} as adjoin's {module name: alpha} policy.

    A group takes the smallest alpha of the layers producing it, so every producer of
    a listed group gets the group's alpha; unlisted groups stay at full width.
    """
    probe = adjoin(arch, alpha=1, policy="all", round_to=round_to, input_size=input_size,
                   num_classes=num_classes)
    producers = {group.name: group.producers for group in probe.width_groups}
    unknown = sorted(set(group_alphas) - set(producers))
    if unknown:
        raise ConfigError(f"--arch-config names width groups {unknown} that this model does not "
                          f"have; its groups are {sorted(producers)} (was the arch JSON searched "
                          f"on another --arch?)")
    return {module: alpha for group, alpha in group_alphas.items() for module in producers[group]}


def create_optimizer(model: torch.nn.Module, config: TrainConfig,
                     device: torch.device) -> torch.optim.Optimizer:
    """SGD / AdamW (torch's fused kernels, on every device) or apex LAMB.

    The fused kernels take the step's non-finite flag as ``found_inf`` and skip the
    update on the device (anfast.train.step), so no step waits for the host; apex
    FusedSGD has no such input, so torch's fused SGD is used even where apex is installed.
    Biases and normalisation parameters (every 1-D tensor) get no weight decay, the
    usual ImageNet recipe (timm's param_groups_weight_decay).
    """
    check_environment(config, device)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "lamb":
        from apex.optimizers import FusedLAMB

        return FusedLAMB(groups, lr=config.lr)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=True)
        if config.momentum:
            # Fused SGD creates its buffers uninitialised on the first step and fills them
            # there, unless that step is skipped (found_inf): start them at zero instead,
            # which gives the same first step (momentum * 0 + grad = grad).
            for param in decay + no_decay:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
        return optimizer
    return torch.optim.AdamW(groups, lr=config.lr, fused=True)
