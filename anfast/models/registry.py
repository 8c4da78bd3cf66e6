"""One place that turns an ``--arch`` string into a model, and an export's source back.

Names, in the order they are tried:

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)`` (the optional
  ``anfast[timm]`` extra);
- anfast's own architectures (``xresnet18`` ... ``xresnet101``);
- a torchvision name: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``.

Nothing is ever downloaded: timm models are built with ``pretrained=False`` and keyword
arguments that would fetch or read weights are refused. ``create_model`` also returns
the *source* that export writes into config.json (``{"timm": NAME, "kwargs": {...}}``,
``{"anfast": ...}`` or ``{"torchvision": ...}``) and ``model_from_source`` rebuilds
from it, so ``anfast.load_student`` needs no pickle.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Optional

from torch import nn

from anfast.models.xresnet import xresnet18, xresnet34, xresnet50, xresnet101

__all__ = ["resolve_arch", "create_model", "model_from_source", "arch_name", "list_models", "MissingExtraError",
           "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"
_ANFAST_MODELS: dict[str, Callable[..., nn.Module]] = {
    "xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50, "xresnet101": xresnet101,
}
# The words of constructor arguments that load weights from a file or the network:
# torchvision's weights / weights_backbone, timm's pretrained / pretrained_cfg(_overlay) /
# checkpoint_path / cache_dir, and the url / download / hub / file / dir arguments of
# other libraries. Matched per "_"-separated word, so drop_path_rate (timm's stochastic
# depth) is not caught by "path"; a name ending in "_path" (or "path" itself) is.
_FETCHING_WORDS = {"weight", "weights", "pretrain", "pretrained", "checkpoint", "url", "urls",
                   "download", "hub", "cache", "file", "files", "dir"}


def fetching_kwargs(names) -> list[str]:
    """The argument names among ``names`` that could load weights from outside (sorted).

    One definition for create_model (what a model may be built with) and load_student
    (what an export's config.json may ask for)."""
    def fetches(name: str) -> bool:
        words = name.lower().split("_")
        return bool(_FETCHING_WORDS.intersection(words)) or words[-1] == "path"
    return sorted(name for name in names if fetches(str(name)))


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


def _import_timm(arch: str):
    try:
        import timm
    except ImportError:
        raise MissingExtraError(f"{arch!r} needs timm, an optional extra: pip install 'anfast[timm]' "
                                "(or pip install timm)") from None
    return timm


def list_models() -> list[str]:
    """anfast's own architecture names (torchvision's: torchvision.models.list_models())."""
    return list(_ANFAST_MODELS)


def _check_kwargs(library: str, name: str, kwargs: Mapping[str, Any]) -> dict:
    """Keyword arguments that config.json can hold and that never fetch weights."""
    loading = fetching_kwargs(kwargs)
    if loading:
        raise ValueError(f"{library} model {name!r}: {loading} would load weights; anfast builds "
                         "architectures only (initialise from a local file with --pretrained PATH)")
    scalar = (str, int, float, bool, type(None))
    bad = sorted(k for k, v in kwargs.items()
                 if not isinstance(v, scalar) and not (isinstance(v, (list, tuple)) and all(
                     isinstance(item, scalar) for item in v)))
    if bad:
        raise ValueError(f"{library} model {name!r}: keyword arguments {bad} are not numbers, strings or "
                         "lists of them; export records them in config.json")
    return dict(kwargs)


def _unknown(arch: str, kind: str, names: list[str], listed_by: str) -> ValueError:
    close = difflib.get_close_matches(arch, names, n=4)
    hint = f"did you mean {close}? " if close else ""
    return ValueError(f"{arch!r} is not {kind}; {hint}the names are listed by {listed_by}")


def resolve_arch(arch: str) -> tuple[str, str]:
    """``(library, name)`` of an ``--arch`` string, checked: the one place names are read.

    ``"timm:resnet50d"`` -> ("timm", "resnet50d"), ``"xresnet50"`` -> ("anfast", ...),
    ``"resnet50"`` -> ("torchvision", ...). Raises ValueError naming close matches for an
    unknown name, MissingExtraError for ``timm:`` without timm.
    """
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch={arch!r}: give a model name such as 'resnet50', 'xresnet50' or 'timm:resnet50d'")
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        timm = _import_timm(arch)
        if not timm.is_model(name):
            raise _unknown(name, "a timm model", timm.list_models(), "timm.list_models()")
        return "timm", name
    if arch in _ANFAST_MODELS:
        return "anfast", arch
    import torchvision

    names = torchvision.models.list_models()
    if arch not in names:
        raise _unknown(arch, "a torchvision model", names + list(_ANFAST_MODELS),
                       "torchvision.models.list_models() (also: anfast's xresnet18/34/50/101, "
                       "and timm:NAME for a timm model)")
    return "torchvision", arch


def create_model(arch: str, **kwargs) -> tuple[nn.Module, dict]:
    """``(model, source)`` for an ``--arch`` string (see the module docstring), never with weights.

    Raises what resolve_arch raises, and ValueError for keyword arguments that would
    load weights or that config.json cannot hold.
    """
    library, name = resolve_arch(arch)
    kwargs = _check_kwargs(library, name, kwargs)
    if library == "timm":
        model = _import_timm(arch).create_model(name, pretrained=False, **kwargs)
    elif library == "anfast":
        model = _ANFAST_MODELS[name](**kwargs)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model, {library: name, "kwargs": kwargs}


def arch_name(source: Mapping[str, Any]) -> Optional[str]:
    """The ``--arch`` string of an export's source, or None for a user class."""
    if "timm" in source:
        return TIMM_PREFIX + source["timm"]
    return source.get("anfast", source.get("torchvision"))


def model_from_source(source: Mapping[str, Any]) -> nn.Module:
    """Rebuild the architecture an export's config.json ``source`` names (no weights).

    Raises ValueError for a user class (``{"class": ...}``), which has no name to
    rebuild from.
    """
    name = arch_name(source)
    if name is None:
        raise ValueError(f"the network is a {source.get('class')}, not a torchvision, timm or anfast model")
    kwargs = source.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"source kwargs {kwargs!r}: expected a JSON object")
    return create_model(name, **kwargs)[0]
