"""``--pretrained PATH``: start an adjoined network from a trained base, never downloading.

PATH is a local file or folder:

- ``*.safetensors``: a state_dict;
- ``*.pt`` / ``*.pth`` / ``*.bin``: a torchvision / timm state_dict (or a dict holding
  one under "state_dict" or "model", as training scripts save), read with
  ``torch.load(weights_only=True)``, so no pickled code runs;
- an anfast export folder (``RUN_DIR/base``: model.safetensors + config.json).

The tensors load into the base (adjoin keeps the original parameter names). The
students need nothing more for their convs and linears, which are the base's leading
slices; their private norms are set to the matching slices of the base's norms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from anfast.adjoin import AdjoinedNetwork
from anfast.nn import AdjoinedBatchNorm2d
from anfast.runs.errors import ConfigError

__all__ = ["read_state_dict", "load_pretrained"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint at ``path`` (see the module docstring), on the CPU."""
    file = Path(path)
    if file.is_dir():
        config_path = file / "config.json"
        if not config_path.is_file() or not (file / "model.safetensors").is_file():
            raise ConfigError(f"--pretrained {path}: a folder must be an anfast export (config.json + "
                              f"model.safetensors, e.g. RUN_DIR/base); give a .safetensors or .pt file otherwise")
        try:
            exported = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"--pretrained {path}: {config_path.name} is not valid JSON ({_first_line(error)}); "
                              f"write the folder again with anfast export RUN_DIR") from None
        if not isinstance(exported, dict):
            raise ConfigError(f"--pretrained {path}: {config_path.name} holds a {type(exported).__name__}, not "
                              f"the object anfast export writes; write the folder again with anfast export RUN_DIR")
        network = exported.get("network")
        if network != "base":
            raise ConfigError(f"--pretrained {path}: an export of the {network}, whose layers are narrower "
                              f"than the base's; pass the run's base/ export")
        file = file / "model.safetensors"
    if not file.is_file():
        raise ConfigError(f"--pretrained {path}: no such file or folder")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as error:
            raise ConfigError(f"--pretrained {file}: not a readable safetensors file ({error})") from None
    if file.suffix not in _TORCH_SUFFIXES:
        raise ConfigError(f"--pretrained {file}: unknown checkpoint type {file.suffix!r}; give a .safetensors, "
                          f"{'/'.join(_TORCH_SUFFIXES)} file or an anfast export folder")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (not a zip / truncated), EOFError...
        raise ConfigError(f"--pretrained {file}: torch.load(weights_only=True) cannot read it "
                          f"({_first_line(error)}); save a state_dict of "
                          f"tensors: torch.save(model.state_dict(), path)") from None
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise ConfigError(f"--pretrained {file}: holds a {type(loaded).__name__}, not a state_dict "
                          f"(a dict of parameter name to tensor)")
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"--pretrained {file}: key {key!r} holds a {type(value).__name__}, not a tensor")
    # torch.nn.parallel.DistributedDataParallel saves its module's keys under "module.".
    if all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    # An anfast training checkpoint holds the students' norms too; the base is what starts.
    return {key: value for key, value in loaded.items() if ".student_norms." not in key}


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (torch.load raises an empty EOFError on an empty file)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_pretrained(an: AdjoinedNetwork, path: str, skip_classifier: bool = False) -> None:
    """Load the checkpoint at ``path`` into ``an``'s base and start the students from it.

    With ``skip_classifier`` the layers producing the model output keep their fresh
    initialisation (for a checkpoint with another number of classes). Every mismatch
    is a ConfigError naming the file, the keys and the fix.
    """
    state = read_state_dict(path)
    expected = an.base_state_dict()
    classifier = tuple(producer for group in an.width_groups if group.fixed == "model output"
                       for producer in group.producers)
    in_classifier = lambda key: any(key.startswith(name + ".") for name in classifier)  # noqa: E731
    if skip_classifier:
        state = {k: v for k, v in state.items() if not in_classifier(k)}
        expected = {k: v for k, v in expected.items() if not in_classifier(k)}
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if mismatched:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)}"
                           for k in mismatched[:3])
        fix = ("the classifier differs (another number of classes?): add --pretrained-skip-classifier to "
               "keep a fresh one" if all(in_classifier(k) for k in mismatched)
               else "is it a checkpoint of this --arch?")
        raise ConfigError(f"--pretrained {path}: {len(mismatched)} tensors have other shapes: {shapes}; {fix}")
    # Checkpoints from before BatchNorm counted its batches lack num_batches_tracked.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(f"--pretrained {path}: keys do not match the base network: missing {missing[:4]}"
                          f"{' ...' if len(missing) > 4 else ''} ({len(missing)} in all), unexpected "
                          f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)} in all); "
                          f"is it a checkpoint of this --arch?")
    parameter = next(an.parameters())
    with torch.no_grad():
        named = {**dict(an.named_parameters()), **dict(an.named_buffers())}
        for key, value in state.items():
            named[key].copy_(value.to(device=parameter.device, dtype=named[key].dtype))
    for module in an.modules():
        if isinstance(module, AdjoinedBatchNorm2d):
            module.copy_base_to_students()
