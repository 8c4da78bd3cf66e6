"""Architectures the field lacks elsewhere, and the one resolver of ``--arch`` names.

    model = anfast.models.xresnet50(num_classes=1000)           # the paper's base network
    model, source = anfast.models.create_model("timm:resnet50d")  # timm / anfast / torchvision
"""

from anfast.models.registry import (TIMM_PREFIX, MissingExtraError, arch_name, create_model, fetching_kwargs,
                                    list_models, model_from_source, resolve_arch)
from anfast.models.xresnet import XResNet, xresnet18, xresnet34, xresnet50, xresnet101

__all__ = [
    "XResNet",
    "xresnet18",
    "xresnet34",
    "xresnet50",
    "xresnet101",
    "resolve_arch",
    "create_model",
    "model_from_source",
    "fetching_kwargs",
    "arch_name",
    "list_models",
    "MissingExtraError",
    "TIMM_PREFIX",
]
