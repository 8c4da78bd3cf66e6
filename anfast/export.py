"""Students and the base as plain nn.Modules; safetensors + JSON on disk, no pickle.

An exported network is the original model class with its conv, norm and linear
modules swapped for physically smaller plain ones holding sliced weights, so user
code that expects a torchvision ResNet keeps working.
"""

from __future__ import annotations

import collections
import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from anfast.adjoin import _STUDENT_STATISTICS, AdjoinedNetwork, LayerWidths
from anfast.models import arch_name, fetching_kwargs, model_from_source
from anfast.nn.conv import conv_form, numeric_padding, student_scale

__all__ = ["export_student", "export_base", "save_exported", "load_student", "read_export",
           "export_digest", "ExportError", "EXPORT_FORMAT"]

EXPORT_FORMAT = "anfast.export/1"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


class ExportError(ValueError):
    """An exported network's files are missing, damaged, or do not describe each other."""


# What config.json may hold; anything else is refused, so a tampered file cannot pass
# arguments through to a constructor. Extend these to add a source type or layer type.
_CONFIG_KEYS = {"format", "network", "index", "alpha", "source", "layers", "tensors"}
_SOURCE_KEYS = {"torchvision": {"torchvision", "kwargs"}, "timm": {"timm", "kwargs"},
                "anfast": {"anfast", "kwargs"}, "class": {"class"}}
_LAYER_KEYS = {
    "Conv2d": {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias"},
    "BatchNorm2d": {"num_features", "eps", "momentum", "affine", "track_running_stats"},
    "BatchNorm1d": {"num_features", "eps", "momentum", "affine", "track_running_stats"},
    "Linear": {"in_features", "out_features", "bias"},
    "LayerNorm": {"normalized_shape", "eps", "elementwise_affine", "bias"},
    "GroupNorm": {"num_groups", "num_channels", "eps", "affine"},
}


def _layer_spec(module: nn.Module) -> dict:
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(numeric_padding(module)), "dilation": list(module.dilation),
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        kind = "BatchNorm1d" if isinstance(module, nn.BatchNorm1d) else "BatchNorm2d"
        return {"type": kind, "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    if isinstance(module, nn.LayerNorm):
        return {"type": "LayerNorm", "normalized_shape": list(module.normalized_shape), "eps": module.eps,
                "elementwise_affine": module.elementwise_affine, "bias": module.bias is not None}
    if isinstance(module, nn.GroupNorm):
        return {"type": "GroupNorm", "num_groups": module.num_groups, "num_channels": module.num_channels,
                "eps": module.eps, "affine": module.affine}
    return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None}


def _layer_from_spec(spec: dict, device: Union[str, torch.device] = "cpu") -> nn.Module:
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Conv2d":
        return nn.Conv2d(**args, device=device)
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        return getattr(nn, kind)(**args, device=device)
    if kind == "Linear":
        return nn.Linear(**args, device=device)
    if kind == "LayerNorm":
        return nn.LayerNorm(**{**args, "normalized_shape": tuple(args["normalized_shape"])}, device=device)
    if kind == "GroupNorm":
        return nn.GroupNorm(**args, device=device)
    raise ValueError(f"unknown layer type {kind!r} in an anfast export config")


# What a layer of a spec may differ in from the model's layer; the rest must match.
_SIZES = {"Conv2d": ("in_channels", "out_channels", "groups"), "BatchNorm2d": ("num_features",),
          "BatchNorm1d": ("num_features",),
          "Linear": ("in_features", "out_features"), "LayerNorm": ("normalized_shape",), "GroupNorm": ("num_channels",)}


def _resize_layer(module: nn.Module, spec: dict, device) -> None:
    """Give ``module`` the sizes of ``spec`` in place, with new uninitialised parameters.

    The module keeps its class, so a timm BatchNormAct2d keeps its activation. ``spec``
    differs from ``module`` in sizes only: export_student reads it from the module's own
    adjoined layer, and load_student checks it first (``_check_layer_targets``).
    """
    fresh = _layer_from_spec(spec, device)
    scale = (conv_form(module) or {}).get("scale") if spec["type"] == "Conv2d" else None
    fan_in = module.weight[0].numel() if scale is not None else 0
    for key in _SIZES[spec["type"]]:
        setattr(module, key, getattr(fresh, key))
    for key, tensor in [*fresh.named_parameters(recurse=False), *fresh.named_buffers(recurse=False)]:
        setattr(module, key, tensor)
    if scale is not None:  # ScaledStdConv2d: gamma / sqrt(fan-in), for the new fan-in (its gain: a tensor)
        module.scale = student_scale(scale, fan_in, module.weight[0].numel())


def _swap_layers(model: nn.Module, specs: dict[str, dict], device, tensors: Optional[dict] = None) -> nn.Module:
    """The exported layers of ``specs`` in place, and the per-channel parameters of
    ``tensors`` ({name: shape}: ConvNeXt's gamma) at their student sizes, uninitialised."""
    for name, spec in specs.items():
        _resize_layer(model.get_submodule(name), spec, device)
    _resize_tensors(model, tensors or {}, device)
    return model


def _resize_tensors(model: nn.Module, tensors: dict[str, list[int]], device) -> None:
    """Give each parameter or buffer named in ``tensors`` that shape, uninitialised, in place."""
    for name, shape in tensors.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attribute)
        new = torch.empty(tuple(shape), device=device, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(owner, attribute, nn.Parameter(new, old.requires_grad))
        else:
            owner.register_buffer(attribute, new, persistent=attribute not in owner._non_persistent_buffers_set)


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
    elif widths.kind == "layernorm":
        weight, bias = module.network_affine(s + 1)
        plain = nn.LayerNorm(widths.student_out[s], module.eps, module.elementwise_affine, bias is not None,
                             device="meta")
        state = {key: value for key, value in (("weight", weight), ("bias", bias)) if value is not None}
    elif widths.kind == "groupnorm":
        weight, bias = module.network_affine(s + 1)
        plain = nn.GroupNorm(module.num_groups, widths.student_out[s], module.eps, module.affine, device="meta")
        state = {key: value for key, value in (("weight", weight), ("bias", bias)) if value is not None}
    else:
        norm = module.student_norms[s]
        plain = module.norm_class(norm.num_features, module.eps, module.momentum, module.affine,
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
    _load_state(model, {k: v.detach().clone() for k, v in state.items()})
    _copy_non_persistent_buffers(an, model, state)
    model.train(an.training)
    model.anfast_config = config
    if path is not None:
        save_exported(model, path)
    return model


def _copy_non_persistent_buffers(an: AdjoinedNetwork, model: nn.Module, state: dict) -> None:
    """Non-persistent buffers (a normalisation constant, timm's blur filters) are in no
    state_dict, and ``to_empty`` left them uninitialised: take each from the adjoined
    network, which keeps them under the same name."""
    for name, buffer in model.named_buffers():
        if name in state:
            continue
        try:
            source = an.get_buffer(name)
        except AttributeError:
            raise ExportError(f"buffer {name!r} of {type(model).__name__} is not in the adjoined "
                              f"network; it cannot be exported") from None
        if source.shape != buffer.shape:
            raise ExportError(f"buffer {name!r} is {tuple(source.shape)} in the adjoined network but "
                              f"{tuple(buffer.shape)} in the export; a layer that holds a per-channel "
                              f"buffer cannot change width: keep it at alpha 1 in the policy")
        with torch.no_grad():
            buffer.copy_(source)


def _load_state(model: nn.Module, state: dict) -> None:
    """``load_state_dict(strict=True)`` under the model's own state_dict versions.

    A plain dict (sliced weights, a safetensors file) has no ``_metadata``, and some
    classes refuse a state without their version (torchvision's MNASNet raises).
    The state was made for this very class, so its current versions are the right ones.
    """
    state = collections.OrderedDict(state)
    state._metadata = model.state_dict()._metadata
    model.load_state_dict(state, strict=True)


def _take_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each floating-point tensor of ``model`` the dtype ``state`` holds for it: a
    float64 or bfloat16 export loads as it was saved, not cast into the float32 that
    the class builds (``load_state_dict`` copies into the existing dtype). In place
    (``.data``), so tied weights stay one tensor; non-persistent buffers take the state's
    floating dtype where it has one."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        saved = state.get(name)
        if (saved is not None and tensor.is_floating_point() and saved.is_floating_point()
                and tensor.dtype != saved.dtype):
            tensor.data = tensor.data.to(saved.dtype)
    # Non-persistent buffers (a normalisation constant) are in no file: they follow the
    # network's floating dtype, as model.to(dtype) would have cast them.
    dtypes = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        for name in _non_persistent_buffers(model):
            buffer = model.get_buffer(name)
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)


def _adjoined_network(an: Any, function: str) -> AdjoinedNetwork:
    """``an``, or the adjoined network that ``torch.compile(an)`` wraps; anything else is refused."""
    network = getattr(an, "_orig_mod", an)
    if not isinstance(network, AdjoinedNetwork):
        raise TypeError(f"{function} takes an adjoined network, got a {type(an).__name__}; "
                        f"pass what anfast.adjoin(model) returns")
    return network


def export_student(an: AdjoinedNetwork, index: int = 0, path: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """Student ``index`` as a plain, physically smaller copy of the original model class.

    Its outputs equal ``an(x).students[index]`` in eval mode. With ``path``, a folder,
    also writes ``path/model.safetensors`` and ``path/config.json`` (see load_student).
    """
    an = _adjoined_network(an, "export_student")
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise TypeError(f"index={index!r}: must be a whole number, the student's position "
                        f"(0 to {an.num_students - 1})")
    index = int(index)
    if not 0 <= index < an.num_students:
        raise IndexError(f"student index {index} out of range: the network has {an.num_students} students")
    model = an.architecture()
    state = {k: v for k, v in an.base_state_dict().items()}
    group_widths = {g.name: g.widths[index] for g in an.width_groups}
    tensors = {}  # per-channel parameters (ConvNeXt's gamma, GRN's weight and bias): their leading slice
    for name, (axis, group) in an.channel_vectors.items():
        if group_widths[group] != state[name].shape[axis]:
            state[name] = state[name].narrow(axis, 0, group_widths[group])
            tensors[name] = list(state[name].shape)
    _resize_tensors(model, tensors, "meta")
    specs = {}
    for name, widths in an.layer_widths.items():
        if widths.kind == "grn":  # timm's GlobalResponseNorm has no size argument: its vectors are sliced above
            continue
        plain, layer_state = _student_layer(an, name, widths, index)
        specs[name] = _layer_spec(plain)
        _resize_layer(model.get_submodule(name), specs[name], "meta")
        # Replace the layer's own entries; other state of the layer (a buffer of the
        # model's that forward never reads, say) stays as it is.
        for key in plain.state_dict():
            state.pop(f"{name}.{key}", None)
        state.update({f"{name}.{k}": v for k, v in layer_state.items()})
    for name in an.statistics_modules:  # running statistics of a module every network runs whole: its own
        own = an.get_submodule(f"{_STUDENT_STATISTICS}.{index}.{name}")
        state.update({f"{name}.{key}": value for key, value in own.state_dict(keep_vars=True).items()
                      if not isinstance(value, nn.Parameter)})
    for alias, target in an.__dict__.get("_aliases", ()):  # a tied tensor follows its resized twin
        if target in state and alias in state:
            state[alias] = state[target]
    config = {
        "format": EXPORT_FORMAT, "network": "student", "index": index,
        "alpha": an.alphas[index], "source": an.source, "layers": specs,
        **({"tensors": tensors} if tensors else {}),
    }
    return _finish(an, model, state, config, path)


def export_base(an: AdjoinedNetwork, path: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """The base network as the original model class; its state_dict loads into that class."""
    an = _adjoined_network(an, "export_base")
    config = {"format": EXPORT_FORMAT, "network": "base", "source": an.source, "layers": {}}
    return _finish(an, an.architecture(), an.base_state_dict(), config, path)


def save_exported(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write an exported network as ``path/model.safetensors`` + ``path/config.json``;
    ``path`` is a folder, made if missing."""
    config = getattr(model, "anfast_config", None)
    if config is None:
        raise ValueError("save_exported takes a network from anfast.export_student / export_base")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((part for part in (path, *path.parents) if part.exists() and not part.is_dir()), path)
        raise NotADirectoryError(f"path={str(path)!r}: {blocker} is not a folder; pass a folder, which will "
                                 f"hold {_WEIGHTS} and {_CONFIG}") from None
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().contiguous().cpu()
        # safetensors refuses two names of one storage (tied weights): the second gets a copy.
        storage = value.untyped_storage().data_ptr()
        state[key] = value.clone() if storage in seen and value.numel() else value
        seen.add(storage)
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
    config.json is checked against the safetensors header before any weight is
    allocated (see ``read_export``); its source's keyword arguments must be ones the
    builder takes, of the types of their defaults; and the network is built on the
    meta device first and allocated at the file's sizes only (``_model_from_source``),
    so a tampered export can neither fetch weights nor allocate sizes the weight file
    does not hold; every refusal is an ExportError naming the file and key.
    """
    path = Path(path)
    config, shapes = read_export(path)
    source, layers, tensors = config["source"], config["layers"], config.get("tensors", {})
    if model is None:
        if arch_name(source) is None:
            raise ExportError(f"{path}: the network is a {source.get('class')}; pass model=<a new instance of it>")
        model = _model_from_source(source, layers, tensors, shapes, path, device)
    else:
        _check_against_weights(model, layers, shapes, path, "pass the architecture the network was exported from",
                               tensors)
        model = _swap_layers(model.to(device), layers, device, tensors)
    state = load_file(path / _WEIGHTS, device=str(device))
    _take_dtypes(model, state)
    _load_state(model, state)
    model.anfast_config = config
    return model.eval()


def _model_from_source(source: dict, layers: dict, tensors: dict, shapes: dict[str, tuple[int, ...]], path: Path,
                       device: Union[str, torch.device]) -> nn.Module:
    """The torchvision, timm or anfast network of an export, allocated at the file's sizes only.

    It is built on the meta device, checked against the safetensors header, and given
    the exported layers there; only then is memory allocated, for exactly the tensors
    the file holds. A student's base architecture, whose size config.json alone decides
    (``kwargs.num_classes``), is never allocated. A model with non-persistent buffers
    (values its constructor computes, in no file) must be built for real: its size is
    then bounded by the memory available (anfast.models.create_model).
    """
    with torch.device("meta"):
        model = _build(source, path)
    _check_against_weights(model, layers, shapes, path, "the export is damaged or was edited; re-export the network",
                           tensors)
    if not _non_persistent_buffers(model):
        return _swap_layers(model, layers, "meta", tensors).to_empty(device=device)
    return _swap_layers(_build(source, path).to(device), layers, device, tensors)


def _build(source: dict, path: Path) -> nn.Module:
    try:
        return model_from_source(source)
    except (ValueError, TypeError) as error:  # a kwarg the builder does not take or of another type, too large a model
        raise ExportError(f"{path / _CONFIG}: source: {error}; re-export the network") from None


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    persistent = model.state_dict().keys()
    return [name for name, _ in model.named_buffers() if name not in persistent]


def export_digest(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of an export's config.json and model.safetensors: two folders with the same
    digest load the same network with the same weights (a copy of a folder keeps it, a
    network trained on or re-exported with other weights does not)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in (path / _CONFIG, path / _WEIGHTS):
        if not file.is_file():
            raise FileNotFoundError(f"{path}: expected {_CONFIG} and {_WEIGHTS} written by anfast.export_student")
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_export(path: Union[str, os.PathLike]) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(config.json, {tensor name: shape} from the safetensors header) of an export, checked.

    Refuses unknown keys, source types and layer types, constructor kwargs that can
    fetch weights, and any layer whose declared size differs from its tensors in the
    header. Reads no tensor data.
    """
    path = Path(path)
    config_file, weights_file = path / _CONFIG, path / _WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path}: expected {_CONFIG} and {_WEIGHTS} written by anfast.export_student")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{config_file}: not valid JSON ({error}); re-export the network") from None
    try:
        with safe_open(str(weights_file), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own and OSError types
        raise ExportError(f"{weights_file}: not a readable safetensors file ({error}); re-export the network") from None
    _check_config(config, config_file)
    for name, spec in config["layers"].items():
        for key, shape in _layer_shapes(spec).items():
            found = shapes.get(f"{name}.{key}")
            if found != shape:
                raise ExportError(f"{config_file}: layers.{name} declares {name}.{key} of shape {list(shape)}, "
                                  f"but {weights_file.name} holds "
                                  f"{list(found) if found is not None else 'no such tensor'}; re-export the network")
    return config, shapes


def _check_config(config: Any, file: Path) -> None:
    def refuse(key: str, problem: str) -> ExportError:
        return ExportError(f"{file}: {key}: {problem}")

    if not isinstance(config, dict):
        raise refuse("(top level)", "expected a JSON object")
    if config.get("format") != EXPORT_FORMAT:
        raise refuse("format", f"{config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise refuse(unknown[0], f"not a key anfast writes (known: {sorted(_CONFIG_KEYS)})")
    source = config.get("source")
    kinds = [kind for kind in _SOURCE_KEYS if isinstance(source, dict) and kind in source]
    if len(kinds) != 1:
        raise refuse("source", f"expected an object with exactly one of {sorted(_SOURCE_KEYS)}")
    unknown = sorted(set(source) - _SOURCE_KEYS[kinds[0]])
    if unknown:
        raise refuse(f"source.{unknown[0]}", f"not allowed with source type {kinds[0]!r}")
    if not isinstance(source[kinds[0]], str):
        raise refuse(f"source.{kinds[0]}", "expected a name (text)")
    kwargs = source.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise refuse("source.kwargs", "expected an object")
    for key, value in kwargs.items():
        if fetching_kwargs([key]):
            raise refuse(f"source.kwargs.{key}", "could load weights from outside the export; refused")
        if not _is_plain(value):
            raise refuse(f"source.kwargs.{key}", "expected a number, text, true/false, null or a list of them")
    tensors = config.get("tensors", {})
    if not isinstance(tensors, dict) or not all(
            isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
            for shape in tensors.values()):
        raise refuse("tensors", "expected an object {parameter name: [positive sizes]}")
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise refuse("layers", "expected an object {module name: layer spec}")
    for name, spec in layers.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in _LAYER_KEYS:
            raise refuse(f"layers.{name}.type", f"{kind!r}, expected one of {sorted(_LAYER_KEYS)}")
        extra, missing = set(spec) - _LAYER_KEYS[kind] - {"type"}, _LAYER_KEYS[kind] - set(spec)
        if extra or missing:
            raise refuse(f"layers.{name}", f"a {kind} takes exactly {sorted(_LAYER_KEYS[kind])}; "
                                           f"unknown {sorted(extra)}, missing {sorted(missing)}")
        for key, value in spec.items():
            if key != "type" and not _is_plain(value, text=False):
                raise refuse(f"layers.{name}.{key}", "expected a number, true/false or a list of numbers")
        try:
            _layer_shapes(spec)
        except (TypeError, ValueError) as error:
            raise refuse(f"layers.{name}", str(error)) from None


def _is_plain(value: Any, text: bool = True) -> bool:
    if isinstance(value, list):
        return all(_is_plain(item, text) and not isinstance(item, list) for item in value)
    return value is None or isinstance(value, (bool, int, float) + ((str,) if text else ()))


def _layer_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes the layer ``spec`` declares, computed without building it."""
    def size(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be a positive whole number")
        return value

    def sizes(key: str) -> tuple[int, ...]:
        if not isinstance(spec[key], list) or len(spec[key]) != 2:
            raise ValueError(f"{key}={spec[key]!r} must be a list of two whole numbers")
        return tuple(size(value, key) for value in spec[key])

    def size_of(key: str) -> int:
        return size(spec[key], key)

    if spec["type"] == "Conv2d":
        groups, kernel = size_of("groups"), sizes("kernel_size")
        if size_of("in_channels") % groups or size_of("out_channels") % groups:
            raise ValueError(f"groups={groups} must divide in_channels and out_channels")
        shapes = {"weight": (size_of("out_channels"), size_of("in_channels") // groups, *kernel)}
        return {**shapes, **({"bias": (size_of("out_channels"),)} if spec["bias"] else {})}
    if spec["type"] == "Linear":
        shapes = {"weight": (size_of("out_features"), size_of("in_features"))}
        return {**shapes, **({"bias": (size_of("out_features"),)} if spec["bias"] else {})}
    if spec["type"] == "GroupNorm":
        channels, groups = size_of("num_channels"), size_of("num_groups")
        if channels % groups:
            raise ValueError(f"num_groups={groups} must divide num_channels={channels}")
        return {"weight": (channels,), "bias": (channels,)} if spec["affine"] else {}
    if spec["type"] == "LayerNorm":
        if not isinstance(spec["normalized_shape"], list) or len(spec["normalized_shape"]) != 1:
            raise ValueError(f"normalized_shape={spec['normalized_shape']!r} must be a list of one whole number")
        features = (size(spec["normalized_shape"][0], "normalized_shape"),)
        if not spec["elementwise_affine"]:
            return {}
        return {"weight": features, **({"bias": features} if spec["bias"] else {})}
    features = (size_of("num_features"),)
    shapes = {"weight": features, "bias": features} if spec["affine"] else {}
    if spec["track_running_stats"]:
        shapes.update(running_mean=features, running_var=features, num_batches_tracked=())
    return shapes


def _check_layer_targets(model: nn.Module, layers: dict, file: Path, fix: str) -> None:
    """Each swapped layer replaces a module of its own type that computes what it would:
    the two differ in sizes only (``_SIZES``), not in stride, padding, eps, ... ``fix``
    ends the message of such a difference."""
    for name, spec in layers.items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{file}: layers.{name}: the {type(model).__name__} has no such module") from None
        if not isinstance(original, getattr(nn, spec["type"])):
            raise ExportError(f"{file}: layers.{name}: a {spec['type']} cannot replace the model's "
                              f"{type(original).__name__}; {fix}")
        if getattr(original, "padding_mode", "zeros") != "zeros":
            raise ExportError(f"{file}: layers.{name}: the model pads with {original.padding_mode!r}, "
                              f"the exported layer with zeros; they would compute different outputs")
        found = _layer_spec(original)
        for key in sorted(spec.keys() - {"type", *_SIZES[spec["type"]]}):
            if found[key] != spec[key]:
                raise ExportError(f"{file}: layers.{name}.{key}: {spec[key]!r} in the export, {found[key]!r} "
                                  f"in the {type(model).__name__}; {fix}")


def _check_against_weights(model: nn.Module, layers: dict, shapes: dict[str, tuple[int, ...]],
                           path: Path, fix: str, tensors: Optional[dict] = None) -> None:
    """``model`` with ``layers`` swapped in has exactly the tensors of the safetensors header;
    ``fix`` ends the message of a layer that computes otherwise (``_check_layer_targets``)."""
    _check_layer_targets(model, layers, path / _CONFIG, fix)
    # A layer under a second name (``self.head = self.fc``) is resized under both.
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    swapped = {alias: spec for name, spec in layers.items() for alias in names[id(model.get_submodule(name))]}
    # A swapped layer's own tensors take the spec's shapes; others it holds (ScaledStdConv2d's
    # gain) stay as the model has them, or as ``tensors`` resizes them.
    replaced = {f"{name}.{key}" for name in swapped for key in _layer_shapes(_layer_spec(model.get_submodule(name)))}
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in replaced}
    for name, spec in swapped.items():
        expected.update({f"{name}.{key}": shape for key, shape in _layer_shapes(spec).items()})
    for name, shape in (tensors or {}).items():
        if name not in expected:
            raise ExportError(f"{path / _CONFIG}: tensors.{name}: the {type(model).__name__} has no such "
                              f"tensor; {fix}")
        expected[name] = tuple(shape)
    file = path / _WEIGHTS
    for key in sorted(set(expected) | set(shapes)):
        if expected.get(key) != shapes.get(key):
            model_has = list(expected[key]) if key in expected else "no such tensor"
            file_has = list(shapes[key]) if key in shapes else "no such tensor"
            raise ExportError(f"{file}: {key}: the network config.json describes has {model_has}, "
                              f"the file holds {file_has}; the export is damaged or was edited")
