"""Students and the base as plain nn.Modules; safetensors + JSON on disk, no pickle.

An exported network is the original model class with its conv, norm and linear
modules swapped for physically smaller plain ones holding sliced weights, so user
code that expects a torchvision ResNet keeps working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anfast.adjoin import AdjoinedNetwork, LayerWidths
from anfast.models import arch_name, model_from_source

__all__ = ["export_student", "export_base", "save_exported", "load_student", "EXPORT_FORMAT"]

EXPORT_FORMAT = "anfast.export/1"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


def _layer_spec(module: nn.Module) -> dict:
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding), "dilation": list(module.dilation),
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None}


def _layer_from_spec(spec: dict, device: Union[str, torch.device] = "cpu") -> nn.Module:
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Conv2d":
        return nn.Conv2d(**args, device=device)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(**args, device=device)
    if kind == "Linear":
        return nn.Linear(**args, device=device)
    raise ValueError(f"unknown layer type {kind!r} in an anfast export config")


# What a layer of a spec may differ in from the model's layer; the rest must match.
_SIZES = {"Conv2d": ("in_channels", "out_channels", "groups"), "BatchNorm2d": ("num_features",),
          "Linear": ("in_features", "out_features")}


def _resize_layer(module: nn.Module, name: str, spec: dict, device) -> None:
    """Give ``module`` the sizes of ``spec`` in place, with new uninitialised parameters.

    The module keeps its class, so a timm BatchNormAct2d keeps its activation.
    """
    fresh = _layer_from_spec(spec, device)
    if not isinstance(module, type(fresh)):
        raise ValueError(f"layer {name}: the export has a {spec['type']}, the model a {type(module).__name__}; "
                         "pass the architecture the network was exported from")
    for key in spec.keys() - {"type", *_SIZES[spec["type"]]}:
        if _layer_spec(module)[key] != spec[key]:
            raise ValueError(f"layer {name}: {key}={spec[key]!r} in the export, {_layer_spec(module)[key]!r} "
                             "in the model; pass the architecture the network was exported from")
    for key in _SIZES[spec["type"]]:
        setattr(module, key, getattr(fresh, key))
    for key, tensor in [*fresh.named_parameters(recurse=False), *fresh.named_buffers(recurse=False)]:
        setattr(module, key, tensor)


def _swap_layers(model: nn.Module, specs: dict[str, dict], device) -> nn.Module:
    for name, spec in specs.items():
        _resize_layer(model.get_submodule(name), name, spec, device)
    return model


def _student_layer(an: AdjoinedNetwork, name: str, widths: LayerWidths, s: int) -> tuple[nn.Module, dict]:
    """A plain module of student s's width and its state (sliced from the adjoined one)."""
    module = an.get_submodule(name)
    if widths.kind == "conv":
        weight, bias, groups = module.network_weight(s + 1)
        plain = nn.Conv2d(widths.student_in[s], widths.student_out[s], module.kernel_size, module.stride,
                          module.padding, module.dilation, groups, bias is not None, device="meta")
        state = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    elif widths.kind == "linear":
        weight, bias = module.network_weight(s + 1)
        plain = nn.Linear(widths.student_in[s], widths.student_out[s], bias is not None, device="meta")
        state = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    else:
        norm = module.student_norms[s]
        plain = nn.BatchNorm2d(norm.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, device="meta")
        state = dict(norm.state_dict())
        if module.share_affine:
            state["weight"] = module._student_slice(module.weight, s)
            state["bias"] = module._student_slice(module.bias, s)
    return plain, state


def _finish(an: AdjoinedNetwork, model: nn.Module, state: dict, config: dict,
            path: Optional[Union[str, os.PathLike]]) -> nn.Module:
    parameter = next(an.parameters())
    model = model.to_empty(device=parameter.device).to(parameter.dtype)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    model.train(an.training)
    model.anfast_config = config
    if path is not None:
        save_exported(model, path)
    return model


def export_student(an: AdjoinedNetwork, index: int = 0, path: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """Student ``index`` as a plain, physically smaller copy of the original model class.

    Its outputs equal ``an(x).students[index]`` in eval mode. With ``path``, also
    writes ``path/model.safetensors`` and ``path/config.json`` (see load_student).
    """
    if not 0 <= index < an.num_students:
        raise IndexError(f"student index {index} out of range: the network has {an.num_students} students")
    model = an.architecture()
    state = {k: v for k, v in an.base_state_dict().items()}
    specs = {}
    for name, widths in an.layer_widths.items():
        plain, layer_state = _student_layer(an, name, widths, index)
        specs[name] = _layer_spec(plain)
        _resize_layer(model.get_submodule(name), name, specs[name], "meta")
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in layer_state.items()})
    config = {
        "format": EXPORT_FORMAT, "network": "student", "index": index,
        "alpha": an.alphas[index], "source": an.source, "layers": specs,
    }
    return _finish(an, model, state, config, path)


def export_base(an: AdjoinedNetwork, path: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """The base network as the original model class; its state_dict loads into that class."""
    config = {"format": EXPORT_FORMAT, "network": "base", "source": an.source, "layers": {}}
    return _finish(an, an.architecture(), an.base_state_dict(), config, path)


def save_exported(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write an exported network as ``path/model.safetensors`` + ``path/config.json``."""
    config = getattr(model, "anfast_config", None)
    if config is None:
        raise ValueError("save_exported takes a network from anfast.export_student / export_base")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Write to temporary names, then rename: a crash never leaves half a model.
    save_file(state, path / (_WEIGHTS + ".tmp"), metadata={"format": EXPORT_FORMAT})
    (path / (_CONFIG + ".tmp")).write_text(json.dumps(config, indent=2))
    os.replace(path / (_WEIGHTS + ".tmp"), path / _WEIGHTS)
    os.replace(path / (_CONFIG + ".tmp"), path / _CONFIG)
    return path


def load_student(path: Union[str, os.PathLike], model: Optional[nn.Module] = None,
                 device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a network written by export_student / export_base (safetensors + JSON, no pickle).

    Torchvision, timm and anfast architectures are rebuilt from their name (timm
    without weights). For other classes pass ``model``, a freshly constructed instance
    of the original (base) architecture.
    """
    path = Path(path)
    if not (path / _CONFIG).is_file() or not (path / _WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: expected {_CONFIG} and {_WEIGHTS} written by anfast.export_student")
    config = json.loads((path / _CONFIG).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path / _CONFIG}: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    source = config["source"]
    if model is None:
        if arch_name(source) is None:
            raise ValueError(f"{path}: the network is a {source.get('class')}; pass model=<a new instance of it>")
        model = model_from_source(source)  # torchvision, timm or anfast, by name
    model = _swap_layers(model.to(device), config["layers"], device)
    model.load_state_dict(load_file(path / _WEIGHTS, device=str(device)), strict=True)
    model.anfast_config = config
    return model.eval()
