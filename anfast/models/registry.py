"""One place that turns an ``--arch`` string into a model, and an export's source back.

Names, in the order they are tried:

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)`` (the optional
  ``anfast[timm]`` extra);
- anfast's own architectures (``xresnet18`` ... ``xresnet101``);
- a torchvision name: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``.

Nothing is ever downloaded: every argument of the builder's signature that could fetch
weights (``fetching_kwargs``: torchvision's ``weights`` and ``weights_backbone``, timm's
``pretrained``, ``pretrained_cfg``, ``checkpoint_path`` ...) is passed as None / False,
whatever its default, and a user's keyword argument that would fetch or read weights is
refused. Every other keyword argument must be one the builder or the class it returns
takes, of the type of its default; and the model is first built on the meta device, so
one that would not fit in the memory available is refused before any allocation.
``create_model`` also returns
the *source* that export writes into config.json (``{"timm": NAME, "kwargs": {...}}``,
``{"anfast": ...}`` or ``{"torchvision": ...}``) and ``model_from_source`` rebuilds
from it, so ``anfast.load_student`` needs no pickle.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import types
import typing
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from anfast.models.xresnet import xresnet18, xresnet34, xresnet50, xresnet101

__all__ = ["resolve_arch", "create_model", "build_on_meta", "model_from_source", "arch_name", "list_models", "fetching_kwargs",
           "available_memory", "MissingExtraError", "TIMM_PREFIX"]

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
# Names with such a word that load nothing: torchvision's GoogLeNet / Inception v3 choose
# their initialisation with init_weights.
_NOT_FETCHING = {"init_weights"}


def fetching_kwargs(names) -> list[str]:
    """The argument names among ``names`` that could load weights from outside (sorted).

    One definition for create_model (what a model may be built with) and load_student
    (what an export's config.json may ask for)."""
    def fetches(name: str) -> bool:
        words = name.lower().split("_")
        return bool(_FETCHING_WORDS.intersection(words)) or words[-1] == "path"
    return sorted(name for name in names if str(name) not in _NOT_FETCHING and fetches(str(name)))


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


def _builder(library: str, name: str) -> Callable[..., nn.Module]:
    """The function whose signature says what a model takes: timm's entrypoint, anfast's
    constructor, torchvision's builder."""
    if library == "timm":
        return _import_timm(TIMM_PREFIX + name).models.model_entrypoint(name)
    if library == "anfast":
        return _ANFAST_MODELS[name]
    import torchvision

    return torchvision.models.get_model_builder(name)


def _signature(function: Callable) -> inspect.Signature:
    """``function``'s signature with its annotations as objects, also in a module written with
    ``from __future__ import annotations`` (anfast's XResNet: ``-> "XResNet"``); as strings
    where they cannot be evaluated (a name imported only under TYPE_CHECKING)."""
    try:
        return inspect.signature(function, eval_str=True)
    except Exception:  # NameError, or anything else the annotations' code raises
        return inspect.signature(function)


def _keyword_parameters(function: Callable) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in _signature(function).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _takes_any_keyword(function: Callable) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _signature(function).parameters.values())


def _annotation_options(annotation: Any) -> tuple:
    """The members of a Union annotation (``Optional[int]``, ``int | None`` -> (int, NoneType)); else the
    annotation."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


def _simple_types(parameter: inspect.Parameter) -> Optional[tuple[type, ...]]:
    """The JSON-expressible types ``parameter`` accepts, or None where its signature cannot tell.

    From its annotation (``Optional[int]`` -> (int, NoneType)), else from the type of its
    default; a float parameter also takes an int, a tuple one a list and a list one a tuple."""
    simple = (bool, int, float, str, type(None), tuple, list)
    annotation = parameter.annotation
    if annotation is not inspect.Parameter.empty and not isinstance(annotation, str):
        options = tuple(typing.get_origin(option) or option for option in _annotation_options(annotation))
        if all(isinstance(option, type) and issubclass(option, simple) for option in options):
            return (options + ((int,) if float in options else ()) + ((list,) if tuple in options else ())
                    + ((tuple,) if list in options else ()))
        return None
    default = parameter.default
    if default is inspect.Parameter.empty or default is None or not isinstance(default, simple):
        return None
    return _simple_types(parameter.replace(annotation=type(default)))


def _check_value(library: str, name: str, key: str, value: Any, parameter: inspect.Parameter) -> None:
    types = _simple_types(parameter)
    if types is None:
        return
    # bool is an int in Python; a flag given for a size (or a size for a flag) is a mistake.
    matches = any(isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in types)
    if not matches:
        expected = " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in types}))
        raise ValueError(f"{library} model {name!r}: {key}={value!r} ({type(value).__name__}), but {key} "
                         f"takes {expected} (default {parameter.default!r})")


def _no_weights(library: str, name: str, functions: tuple[Callable, ...]) -> dict:
    """Every argument of ``functions`` that could fetch weights, set to None (False for a flag).

    Refuses an architecture whose signature requires weights: an argument that can
    fetch them, has no default and whose annotation admits neither None nor False."""
    off = {}
    for function in functions:
        for key, parameter in _keyword_parameters(function).items():
            if not fetching_kwargs([key]):
                continue
            off[key] = False if isinstance(parameter.default, bool) else None
            annotation = parameter.annotation
            if parameter.default is inspect.Parameter.empty and annotation is not inspect.Parameter.empty:
                if not {type(None), bool, Any}.intersection(_annotation_options(annotation)):
                    raise ValueError(f"{library} model {name!r} cannot be built without weights ({key} is "
                                     "required); anfast builds architectures only: choose another --arch")
    return off


def _check_signature(library: str, name: str, kwargs: Mapping[str, Any], functions: tuple[Callable, ...]) -> None:
    """Each keyword argument is one that ``functions``, or the class the last returns, take, of its type."""
    parameters, open_ended = {}, False
    for function in functions:
        parameters.update((key, p) for key, p in _keyword_parameters(function).items() if key != "model_name")
        open_ended = _takes_any_keyword(function)
    returned = _signature(functions[-1]).return_annotation
    if open_ended and isinstance(returned, type) and issubclass(returned, nn.Module):
        # Builders pass their **kwargs on to the model class they return.
        parameters = {**_keyword_parameters(returned.__init__), **parameters}
        open_ended = _takes_any_keyword(returned.__init__)
    for key, value in kwargs.items():
        if key in parameters:
            _check_value(library, name, key, value, parameters[key])
        elif not open_ended:
            close = difflib.get_close_matches(key, list(parameters), n=3)
            raise ValueError(f"{library} model {name!r} takes no keyword argument {key!r}"
                             f"{f' (did you mean {close}?)' if close else ''}")


def available_memory() -> int:
    """Bytes this process could allocate now: MemAvailable of /proc/meminfo (free memory
    plus reclaimable caches), else the machine's physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_size(arch: str, kwargs: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse a model (built on meta) whose parameters and buffers exceed the available memory."""
    tensors = [*model.parameters(), *model.buffers()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    memory = available_memory()
    if size > memory:
        count = sum(t.numel() for t in tensors)
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"{arch}{f' with {given}' if given else ''} holds {count:,} parameters and buffers, "
                         f"{_in_binary_units(size)}, more than the {_in_binary_units(memory)} of memory "
                         "available; choose smaller sizes")


def _in_binary_units(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


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


# torchvision models whose forward returns auxiliary outputs in train mode only.
_TRAIN_ONLY_OUTPUTS = {("torchvision", "googlenet"), ("torchvision", "inception_v3")}


def create_model(arch: str, **kwargs) -> tuple[nn.Module, dict]:
    """``(model, source)`` for an ``--arch`` string (see the module docstring), never with weights.

    Under ``torch.device("meta")`` the model is built there (no memory), as load_student
    does to check an export before it allocates. Raises what resolve_arch raises, and
    ValueError for keyword arguments that would load weights, that config.json cannot
    hold or that the builder does not take (name or type), for an architecture that
    needs weights, and for a model larger than the memory available.
    """
    library, name = resolve_arch(arch)
    kwargs = _check_kwargs(library, name, kwargs)
    if (library, name) in _TRAIN_ONLY_OUTPUTS:
        # Their auxiliary classifiers exist in train mode only, which one fx graph cannot
        # hold (adjoin refuses them); AN trains the main output alone.
        kwargs.setdefault("aux_logits", False)
    builder = _builder(library, name)
    if library == "timm":  # timm.create_model(name, ...) takes arguments of its own, then the entrypoint's
        timm_create = _import_timm(arch).create_model
        signatures, build = (timm_create, builder), functools.partial(timm_create, name)
    else:
        signatures, build = (builder,), builder
    _check_signature(library, name, kwargs, signatures)
    off = _no_weights(library, name, signatures)
    source = {library: name, "kwargs": kwargs}
    on_meta = _builder_sets_none_of(kwargs, library, name, functools.partial(build, **off, **kwargs))
    if torch.get_default_device().type == "meta":
        return on_meta, source
    _check_size(arch, kwargs, on_meta)
    return build(**off, **kwargs), source


def _builder_sets_none_of(kwargs: Mapping[str, Any], library: str, name: str, build: Callable[[], nn.Module]
                          ) -> nn.Module:
    """``build_on_meta(build)``; a keyword argument the builder passes itself as well
    (torchvision's resnet18 passes ``layers``) is refused in one line, naming it, instead of
    the builder's "got multiple values". Builders that merge the user's arguments over
    their own (timm's) build with them."""
    try:
        return build_on_meta(build)
    except TypeError as error:
        clash = next((key for key in kwargs if f"got multiple values for argument '{key}'" in str(error)
                      or f"got multiple values for keyword argument '{key}'" in str(error)), None)
        if clash is None:
            raise
        raise ValueError(f"{library} model {name!r} sets {clash} itself (it is what {name!r} names); to change "
                         f"it, choose another architecture") from None


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its parameters and buffers on the meta device: no memory.

    A builder that computes with tensors to choose its sizes (torchvision's RegNets call
    ``.tolist()``) cannot run under ``torch.device("meta")``; it then runs on the CPU with
    each parameter and buffer moved to meta as it is registered, so memory holds one
    layer's tensors at a time, never the model's."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:  # "Cannot copy out of meta tensor": sizes computed from data
        pass
    from torch.nn.modules import module as nn_module

    def parameter(module, name, value):
        return None if value is None else nn.Parameter(value.to("meta"), value.requires_grad)

    def buffer(module, name, value):
        return None if value is None else value.to("meta")

    handles = [nn_module.register_module_parameter_registration_hook(parameter),
               nn_module.register_module_buffer_registration_hook(buffer)]
    try:
        with torch.device("cpu"):
            return build()
    finally:
        for handle in handles:
            handle.remove()


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
