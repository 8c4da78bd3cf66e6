"""``adjoin``: the torch.fx pass that turns a CNN into an adjoined network.

Steps (DESIGN.md section 1):
1. trace the model and propagate shapes on an example input;
2. follow the channel dimension of every tensor: convs and linears create new
   dimensions, elementwise ops between tensors merge theirs into one *width group*
   (union-find, as Torch-Pruning does), a concat records which parts it joins, a
   flatten remembers how many features each channel became; an op it cannot follow
   channels through (a view of 2C as (2, C), attention on tokens) runs whole, at the
   model's widths, up to the next conv, linear or batch norm;
3. give every width group one student width per student, from the policy;
4. rebuild the graph with one copy of each op per network, the convs, norms and
   linears replaced by adjoined modules that compute every network at once.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import itertools
import math
import numbers
import operator
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F
from torch.fx.passes.shape_prop import ShapeProp

from anfast.nn import (AdjoinedBatchNorm1d, AdjoinedBatchNorm2d, AdjoinedConv2d, AdjoinedGlobalResponseNorm,
                       AdjoinedGroupNorm, AdjoinedLayerNorm, AdjoinedLinear)
from anfast.nn.conv import conv_form, numeric_padding, unknown_backend
from anfast.nn.modes import eval_mode
from anfast.nn.reduction import SHIFTING_OPS, StudentReduction

__all__ = [
    "AdjoinError",
    "AdjoinedOutput",
    "AdjoinedNetwork",
    "WidthGroup",
    "LayerWidths",
    "adjoin",
    "student_width",
    "PAPER_MIN_CHANNELS",
]

Alpha = Union[float, Sequence[float]]
Policy = Union[str, Mapping[str, Any], Callable[[str, nn.Module], Any]]

# The authors' ResNet-50 rule: a conv shrinks when its base in and out channels both
# exceed 64, which keeps the stem and layer1 at full width.
PAPER_MIN_CHANNELS = 64


class AdjoinError(ValueError):
    """A model, alpha or policy that adjoin cannot apply; the message names the fix."""


class AdjoinedOutput(NamedTuple):
    """Outputs of an adjoined network: the base's and one per student (widest first)."""

    base: Any
    students: tuple

    @property
    def student(self) -> Any:
        """The first (widest) student's output."""
        return self.students[0]


def _make_output(base, *students) -> AdjoinedOutput:
    return AdjoinedOutput(base, tuple(students))


torch.fx.wrap("_make_output")


def student_width(channels: int, alpha: float, round_to: int = 8, multiple: int = 1) -> int:
    """width(C, alpha) = C if alpha == 1 else min(C, round_up(ceil(C / alpha), step)).

    ``step`` is lcm(round_to, multiple): grouped convs keep whole groups. ``alpha`` is a
    finite number >= 1 (ValueError otherwise: inf would give 0 channels, a negative one
    a negative width).
    """
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 1):
        raise ValueError(f"alpha={alpha!r}: give a finite number >= 1 (the student is 1/alpha as wide)")
    if alpha == 1:
        return channels
    step = math.lcm(max(1, int(round_to)), max(1, int(multiple)))
    return min(channels, step * math.ceil(math.ceil(channels / alpha) / step))


@dataclass
class WidthGroup:
    """Tensors whose channels must have one student width (they meet elementwise)."""

    name: str
    channels: int
    widths: tuple[int, ...]
    alphas: tuple[float, ...]
    producers: tuple[str, ...]
    fixed: str = ""  # why the group cannot shrink ("" when it can)
    multiple: int = 1  # widths are multiples of this (whole conv groups)
    # Ops that reduce over these channels (x.mean(1), torch.max(x, 1)[0], softmax along
    # them): each network reduces its own channels, so a student shrinks them as usual,
    # but a DAN search, which masks channels to zero at full width, leaves them unsearched.
    reduced_by: tuple[str, ...] = ()


@dataclass
class LayerWidths:
    """Base and student widths of one adjoined layer."""

    kind: str  # "conv", "linear", "norm" (a batch norm), "layernorm", "groupnorm" or "grn"
    in_channels: int
    out_channels: int
    student_in: tuple[int, ...]
    student_out: tuple[int, ...]
    in_group: str
    out_group: str
    in_indices: tuple[Optional[torch.Tensor], ...] = ()
    in_parts: tuple[str, ...] = ()  # the width groups a concatenated input ("concat") joins


# ----------------------------------------------------------------------------- dims


class _Dim:
    """One channel dimension; union-find node."""

    def __init__(self, size: int, producer: Optional[str] = None, fixed: str = "", label: str = ""):
        self.parent: _Dim = self
        self.size = size
        self.producers = [producer] if producer else []
        self.label = label  # the group's name when no layer produces it ("" for "input")
        self.fixed = fixed
        self.multiple = 1
        self.order = 0
        self.reduced_by: list[str] = []  # ops that reduce over these channels (x.mean(1))

    def root(self) -> "_Dim":
        node = self
        while node.parent is not node:
            node = node.parent
        return node


def _union(a: _Dim, b: _Dim, where: str) -> None:
    a, b = a.root(), b.root()
    if a is b:
        return
    if a.size != b.size:
        raise AdjoinError(f"{where}: tensors with {a.size} and {b.size} channels meet elementwise")
    if b.order < a.order:
        a, b = b, a
    b.parent = a
    a.producers += b.producers
    a.reduced_by += b.reduced_by
    a.fixed = a.fixed or b.fixed
    a.multiple = math.lcm(a.multiple, b.multiple)


@dataclass
class _Channels:
    """The channel axis (axis 1) of a tensor: concatenated parts, each a dim."""

    parts: tuple[_Dim, ...]
    features_per_channel: int = 1  # > 1 after flattening C x H x W into features

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts) * self.features_per_channel

    def simple(self) -> Optional[_Dim]:
        return self.parts[0] if len(self.parts) == 1 and self.features_per_channel == 1 else None


@dataclass
class _Analysis:
    channels: dict = field(default_factory=dict)  # node -> _Channels
    shared: set = field(default_factory=set)  # nodes equal in every network
    layers: dict = field(default_factory=dict)  # module name -> (kind, in _Channels, out _Channels)
    reads_shared: dict = field(default_factory=dict)  # module name -> whether its input is in `shared`
    dims: list = field(default_factory=list)
    channelless: set = field(default_factory=set)  # per-network nodes whose channel axis a reduction removed
    sequences: set = field(default_factory=set)  # per-network (N, 1, C, ...) views, channels on axis 2 (ECA, GC)
    channels_last: set = field(default_factory=set)  # per-network (N, H, W, C) permutes (ConvNeXt's blocks)
    vectors: dict = field(default_factory=dict)  # node -> (_Dim, axis): a per-channel parameter (layer scale) or a view
    whole: dict = field(default_factory=dict)  # node -> why: run at the model's shapes in every network
    size_reads: list = field(default_factory=list)  # (channels of a view, tensors whose channel counts size it, where)
    channel_ops: dict = field(default_factory=dict)  # node -> FLOPs per channel: ECA's Conv1d, GC's matmul
    # node -> (_Dim, keeps channels): an op over one group's channels on axis 1 that each width
    # choice of a DAN search computes on its own leading channels (_reduces_per_width)
    reductions: dict = field(default_factory=dict)
    statistics: set = field(default_factory=set)  # modules every network runs that hold running statistics


class _Unfollowable(Exception):
    """An op anfast cannot follow channels through; the message gives its shapes,
    ``(2, 128, 6, 6) -> (2, 2, 64, 6, 6)``, after ``on`` (where the channels were) and
    before ``detail``."""

    def __init__(self, *before: Sequence[int], after: Sequence[int], on: str = "", detail: str = ""):
        shapes = " and ".join(str(tuple(shape)) for shape in before)
        super().__init__(f"{on}{shapes} -> {tuple(after)}{detail}")


_ELEMENTWISE = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
    operator.truediv, torch.add, torch.mul, torch.sub, torch.div,
    "add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_",
}
_FLATTEN = {torch.flatten, "flatten", "view", "reshape"}
_CONCAT = {torch.cat, torch.concat}


def _node_shape(node: torch.fx.Node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found = []
    torch.fx.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _node_shape(n) is not None else None)
    return found


def _tuple_source(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The op whose tuple of tensors ``node`` takes an element of (``torch.max(x, 1)[0]``,
    ``.values``, a chunk, split, sort or topk), or None."""
    if node.op != "call_function" or not (node.target is operator.getitem or (
            node.target is getattr and node.args[1] in ("values", "indices"))):
        return None
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.op in ("placeholder", "get_attr"):
        return None
    meta = source.meta.get("tensor_meta")  # a tuple of TensorMetadata (itself a NamedTuple)
    return source if _node_shape(source) is None and isinstance(meta, (tuple, list)) else None


def _describe(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_module" else f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def _describe_element(node: torch.fx.Node, source: torch.fx.Node) -> str:
    """``max_1 (call_function max)[0]``, or ``.values``: ``node``, an element of ``source``'s tuple."""
    key = node.args[1]
    return f"{_describe(source)}.{key}" if isinstance(key, str) else f"{_describe(source)}[{key}]"


def _analyse(gm: torch.fx.GraphModule, state_keys: set) -> _Analysis:
    """Follow every tensor's channels through ``gm`` (module docstring, step 2);
    ``state_keys``, the model's state_dict keys, tell its parameters and persistent
    buffers from constants the tracer made."""
    result = _Analysis()
    modules = dict(gm.named_modules())

    def new_dim(size: int, producer=None, fixed="", label="") -> _Dim:
        dim = _Dim(size, producer, fixed, label)
        dim.order = len(result.dims)
        result.dims.append(dim)
        return dim

    def channels_of(node) -> Optional[_Channels]:
        return result.channels.get(node)

    vector_dims: dict[str, _Dim] = {}  # one dim per parameter, however often it is read
    for node in gm.graph.nodes:
        shape = _node_shape(node)
        inputs = _tensor_inputs(node)
        source = _tuple_source(node)
        if source is not None:  # torch.max(x, 1)[0], x.chunk(2)[1]: the op's tensors are the inputs
            inputs = _tensor_inputs(source)
        if node.op in ("placeholder", "get_attr"):
            result.shared.add(node)
            # Only the model's own state: an export slices it (a tracer's constant, a
            # non-persistent buffer are taken whole from the network).
            axis = _vector_axis(shape) if node.op == "get_attr" and node.target in state_keys else None
            if axis is not None:
                # A per-channel vector (a layer scale (C,), (C, 1, 1), (1, C, 1, 1)): each
                # network reads its leading slice where it meets their channels (below).
                dim = vector_dims.setdefault(node.target, new_dim(shape[axis], label=node.name))
                result.vectors[node] = (dim, axis)
                if axis == 1:
                    result.channels[node] = _Channels((dim,))
                continue  # a (C, 1, 1) vector's axis 1 holds no channels of its own
            if shape is not None and len(shape) >= 2:
                fixed = "model input" if node.op == "placeholder" else f"parameter / buffer {node.target}"
                label = "" if node.op == "placeholder" else node.name  # a buffer read twice: two nodes
                result.channels[node] = _Channels((new_dim(shape[1], fixed=fixed, label=label),))
            continue
        if node.op == "output":
            def mark_fixed(n):
                ch = channels_of(n)
                for part in ch.parts if ch else ():
                    root = part.root()
                    root.fixed = root.fixed or "model output"
            torch.fx.map_arg(node.args, mark_fixed)
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        # Every input node, not only those with a tensor shape: an element of a tuple
        # (torch.max(x, 1)[0]) is equal in every network only if the tuple is.
        if (all(n in result.shared for n in node.all_input_nodes)
                and not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))):
            if node.op != "call_module" or not any(True for _ in module.parameters()):
                result.shared.add(node)
        if shape is None:
            continue  # sizes, ints, tuples of sizes
        in_channels = [channels_of(n) for n in inputs]
        where = _describe(node) if source is None else _describe_element(node, source)
        function = node.target if node.op in ("call_function", "call_method") else None
        x_shape = _node_shape(inputs[0]) if inputs else None
        region = next((result.whole[n] for n in inputs if n in result.whole), None)
        if region is not None and not _leaves_region(module):
            _run_whole(node, shape, inputs, region, module, where, result)
            continue
        if region is not None and channels_of(inputs[0]) is None:
            # A layer ends the region: its input's channels, full width, are a group of their own.
            in_channels[0] = result.channels[inputs[0]] = _Channels((new_dim(x_shape[1], fixed=region,
                                                                              label=inputs[0].name),))
        try:
            if any(n in result.sequences for n in inputs):
                result.channels[node] = channels_of(next(n for n in inputs if n in result.sequences))
                if _follow_sequence(node, shape, inputs, module, where, result):
                    result.sequences.add(node)
                continue
            if any(n in result.channels_last for n in inputs):
                _follow_channels_last(node, shape, inputs, module, where, result, new_dim)
                continue
            if (function in (torch.permute, "permute") and _permutation(node) == (0, 2, 3, 1) and len(inputs) == 1
                    and in_channels[0] is not None and in_channels[0].features_per_channel == 1):
                # ConvNeXt: (N, C, H, W) -> (N, H, W, C) for a LayerNorm and Linear layers on the channels.
                result.channels[node] = in_channels[0]
                result.channels_last.add(node)
                continue
            if (function in _SEQUENCE_VIEWS and len(inputs) == 1 and x_shape is not None and len(x_shape) >= 2
                    and x_shape[1] > 1 and tuple(shape) == (x_shape[0], 1, *x_shape[1:])
                    and in_channels[0] is not None and in_channels[0].features_per_channel == 1
                    and (function not in (torch.unsqueeze, "unsqueeze") or _dim_argument(node, 1) in (1, -len(shape) + 1))):
                # ECA: pooled (N, C) viewed as (N, 1, C), so a Conv1d slides along the channels;
                # GC: (N, C, H * W) as (N, 1, C, H * W), to pool space by a matmul.
                result.channels[node] = in_channels[0]
                result.sequences.add(node)
                continue
            follows_x = bool(in_channels) and in_channels[0] is not None and len(x_shape) >= 2
            reduced = _reduced_axes(source or node, len(x_shape)) if follows_x else None
            norm_kind = _adopted_norm_kind(module, shape)
            if follows_x and not norm_kind and (1 in (reduced or ()) or _mixes_channels(source or node, module,
                                                                                     len(x_shape))):
                # Each network reduces its own channels; a DAN search, whose masks leave zeros
                # that would count, mixes each width choice's op (StudentReduction) where it can.
                if _reduces_per_width(source or node, source is not None, inputs, in_channels[0], result):
                    result.reductions[source or node] = (in_channels[0].parts[0], 1 not in (reduced or ()))
                else:
                    for part in in_channels[0].parts:
                        part.root().reduced_by.append(where)

            if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
                raise AdjoinError(f"{where}: {type(module).__name__} is not supported; anfast adjoins Conv2d "
                                  f"(2-D image CNNs)")
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
                _check_layer_class(module, where)
            if isinstance(module, nn.Conv2d):
                x = in_channels[0]
                if x is None or x.features_per_channel != 1:
                    raise _Unfollowable(x_shape, after=shape)
                if module.padding_mode != "zeros":
                    raise AdjoinError(f"{where}: padding_mode={module.padding_mode!r}; anfast supports 'zeros'")
                try:
                    numeric_padding(module)
                except ValueError as error:
                    raise AdjoinError(f"{where}: {error}") from None
                # A weight-standardised conv (conv_form) needs no mark: each network standardises
                # its filters over its own input channels, and so does each width choice of a
                # DAN search (anfast.dan.gates).
                out = new_dim(module.out_channels, producer=node.target)
                if module.groups > 1:
                    in_dim = x.simple()
                    in_per_group = module.in_channels // module.groups
                    out_per_group = module.out_channels // module.groups
                    if in_dim is None or in_per_group != out_per_group:
                        # No student slice keeps whole groups on both sides: its input and
                        # output channels keep full width (a policy that shrinks them is refused).
                        why = (f"channels of the grouped conv {where} (groups={module.groups}, {module.in_channels} in "
                               f"and {module.out_channels} out channels), which keeps full width: anfast slices "
                               "whole groups only when the input is one width group and in/out group widths match")
                        _keep_full_width(x, why)
                        _keep_full_width(_Channels((out,)), why)
                    else:
                        out.multiple = out_per_group
                        _union(in_dim, out, where)
                result.channels[node] = _Channels((out,))
                _record_layer(result, node, "conv", x, result.channels[node], where)
            elif isinstance(module, nn.Linear):
                x = in_channels[0]
                if x is None or len(shape) != 2:  # a Linear on tokens (N, T, C): whole
                    raise _Unfollowable(x_shape, after=shape)
                result.channels[node] = _Channels((new_dim(module.out_features, producer=node.target),))
                _record_layer(result, node, "linear", x, result.channels[node], where)
            elif norm_kind in ("layernorm", "grn"):
                # timm's LayerNorm2d on (N, C, H, W), a LayerNorm on (N, C) features, GRN on (N, C, H, W).
                _record_layer_norm(result, node, in_channels[0], where, kind=norm_kind)
            elif norm_kind == "groupnorm":
                _record_layer_norm(result, node, in_channels[0], where, kind="groupnorm")
                leading = sum(part.size for part in in_channels[0].parts[:-1])  # a concat's whole parts
                if leading % module.num_groups:
                    _keep_full_width(_Channels(in_channels[0].parts[-1:]), (
                        f"channels of the last part of a concat that the GroupNorm {where} normalises in "
                        f"{module.num_groups} groups: the {leading} channels before it are no whole number of groups"))
                for part in in_channels[0].parts:  # each network's width: whole groups
                    part.root().multiple = math.lcm(part.root().multiple, module.num_groups)
            elif (function in _FLATTEN and inputs and inputs[0] in result.vectors
                  and _vector_axis(shape) is not None and max(shape) == result.vectors[inputs[0]][0].size):
                # A per-channel vector viewed as (1, C, 1, 1) or (1, 1, 1, C) (ConvNeXt's gamma,
                # GRN's affine parameters): the same vector, its leading slice in each student.
                dim, axis = result.vectors[inputs[0]][0], _vector_axis(shape)
                result.vectors[node] = (dim, axis)
                if function != "flatten" and function is not torch.flatten:  # self.scale.view(self.shape)
                    _check_sizes(node, inputs[0], where, result, axis, _Channels((dim,)))
                if axis == 1:
                    result.channels[node] = _Channels((dim,))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                    raise AdjoinError(f"{where}: {type(module).__name__} is not supported; anfast adjoins "
                                      "BatchNorm2d and BatchNorm1d")
                if in_channels[0] is None or in_channels[0].features_per_channel != 1:
                    raise _Unfollowable(x_shape, after=shape)  # BatchNorm1d on flattened maps
                result.channels[node] = in_channels[0]
                _record_layer(result, node, "norm", in_channels[0], in_channels[0], where)
            elif function is not None and function in _CONCAT and _concat_dim(node) == 1:
                parts = [channels_of(n) for n in _concat_tensors(node)]
                if any(p is None or p.features_per_channel != 1 for p in parts):
                    raise _Unfollowable(x_shape, after=shape)
                result.channels[node] = _Channels(tuple(d for p in parts for d in p.parts))
            elif 1 in (reduced or ()):
                # x.mean(1, keepdim=True), torch.max(x, 1)[0]: each network's reduction of its
                # own channels; one channel per network out of it, or none without keepdim.
                if len(shape) == len(x_shape):
                    result.channels[node] = _Channels((new_dim(shape[1], fixed=f"output of the channel reduction "
                                                                               f"{where}", label=node.name),))
                else:
                    result.channelless.add(node)
            elif (follows_x and len(shape) == len(x_shape) and shape[1] != x_shape[1]
                  and _slices_channels(source or node, len(x_shape))):
                # x.split(self.expand_chs // 2, 1), x[:, :self.out_chs]: sizes fixed in the
                # model's code, which the exported student (the model's own class) runs too, so
                # the sliced channels keep full width; what each part goes on to compute shrinks.
                sliced_by = _describe(source or node)
                _keep_full_width(in_channels[0], f"channels that {sliced_by} slices")
                result.channels[node] = _Channels((new_dim(shape[1], fixed=f"output of the channel slice {where}",
                                                           label=node.name),))
            elif function in _ELEMENTWISE or function in _FLATTEN or isinstance(module, nn.Flatten):
                result.channels[node] = _follow_simple_op(node, shape, inputs, in_channels, where, result.vectors)
                if _shifts(node, shape, inputs, in_channels, result):
                    # A mask's zeros would take the shift: each width choice shifts its own channels.
                    result.reductions[node] = (in_channels[0].parts[0], True)
            elif inputs:
                owner = module if source is None or source.op != "call_module" else modules[source.target]
                result.channels[node] = _follow_generic(source or node, shape, inputs, in_channels, where, owner,
                                                         result.statistics)
            if function in _SIZING and result.channels.get(node) is not None and channels_of(inputs[0]) is not None:
                _check_sizes(node, inputs[0], where, result)
            if result.channels.get(node) is None:
                flat = next((n for n in inputs if n in result.channelless), None)
                if flat is not None:  # a channel-less map: torch.sigmoid of it, then unsqueeze(1) or stack(dim=1)
                    flat_shape = _node_shape(flat)
                    if len(shape) == len(flat_shape):
                        result.channelless.add(node)
                    elif (len(shape) == len(flat_shape) + 1 and shape[:1] + shape[2:] == flat_shape) or (
                            len(shape) == 2 < len(flat_shape) and shape[1] == math.prod(flat_shape[1:])):
                        # unsqueeze(1) / stack(dim=1), or flatten(1) into features: fixed channels
                        result.channels[node] = _Channels((new_dim(shape[1], fixed=f"channels {where} makes of "
                                                                                   f"channel reductions", label=node.name),))
        except _Unfollowable as cannot:
            # Attention, a radix split, a space-to-depth: each network computes it whole, as
            # the model does, from inputs kept at full width, up to the next conv or linear.
            why = f"channels read by {where}, {cannot}, which anfast cannot follow channels through"
            _run_whole(node, shape, inputs, why, module, where, result)
    _check_size_reads(result)
    _check_vector_uses(result)
    return result


def _vector_axis(shape: Optional[torch.Size]) -> Optional[int]:
    """The axis of a per-channel vector's channels: the one axis longer than 1, else None."""
    long = [axis for axis, size in enumerate(shape or ()) if size > 1]
    return long[0] if len(long) == 1 else None


# Ops by which a per-channel vector scales a map: a mask that zeroes a channel zeroes it after them.
_SCALING = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}


def _check_vector_uses(result: _Analysis) -> None:
    """A per-channel vector (or a view of it) whose use anfast did not join to a map's
    channels (a sum of it, a F.linear bias) keeps full width: slicing it would change that
    use. One added to a map (a bias, GRN's) puts its value in channels a DAN mask zeroed,
    so its group is marked ``reduced_by`` (unsearched)."""
    for node, (dim, _) in result.vectors.items():
        parameter = node
        while parameter.op != "get_attr":  # a view of a view of the parameter
            parameter = next(n for n in parameter.all_input_nodes if n in result.vectors)
        for user in node.users:
            if user in result.vectors:
                continue  # a view of it: its own entry checks its users
            channels = result.channels.get(user)
            if channels is None or not any(part.root() is dim.root() for part in channels.parts):
                root = dim.root()
                root.fixed = root.fixed or (f"channels of {parameter.target} {tuple(_node_shape(parameter))}, "
                                            f"which {_describe(user)} reads")
            elif user.target not in _SCALING:
                dim.root().reduced_by.append(f"{_describe(user)} (adds {parameter.target})")


def _permutation(node: torch.fx.Node) -> Optional[tuple]:
    """The dims of ``x.permute(0, 2, 3, 1)``, ``torch.permute(x, (0, 2, 3, 1))``, ``dims=``."""
    dims = node.kwargs.get("dims", node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else None)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % len(dims) for d in dims)  # permute(0, -2, -1, 1) is permute(0, 2, 3, 1)


# LayerNorm classes adjoin adopts as a layer, by the axis they normalise: the last one,
# or axis 1 of (N, C, H, W). timm's compute what nn.LayerNorm does (unless its fast-norm
# kernels are on, which compute it otherwise).
_LAYER_NORMS = {"timm.layers.norm.LayerNorm": -1, "timm.layers.norm.LayerNorm2d": 1,
                "torchvision.models.convnext.LayerNorm2d": 1}


def _layer_norm_axis(module: nn.LayerNorm) -> Optional[int]:
    """-1 or 1: the axis of the channels a LayerNorm anfast adopts normalises; None for others."""
    if len(module.normalized_shape) != 1 or getattr(module, "_fast_norm", False):
        return None
    return -1 if type(module).forward is nn.LayerNorm.forward else _LAYER_NORMS.get(_qualified_name(type(module)))


def _adopts_layer_norm(module: nn.LayerNorm, shape, channels_last: bool) -> bool:
    """Whether ``module`` normalises exactly the channels of its (N, H, W, C) input when
    ``channels_last``, else of its (N, C, H, W) or (N, C) input."""
    axis = _layer_norm_axis(module)
    if channels_last:
        return axis == -1 and len(shape) == 4 and shape[-1] == module.normalized_shape[0]
    return shape[1] == module.normalized_shape[0] and ((axis == 1 and len(shape) == 4) or (axis == -1 and len(shape) == 2))


# GroupNorm classes adjoin adopts as a layer: timm's compute what nn.GroupNorm does (unless
# its fast-norm kernels are on), the "Act" ones then their parameter-free .drop and .act.
_GROUP_NORMS = {"timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1", "timm.layers.norm_act.GroupNormAct",
                "timm.layers.norm_act.GroupNorm1Act"}


def _adopts_group_norm(module: nn.GroupNorm, shape) -> bool:
    """Whether ``module`` is a GroupNorm anfast rebuilds, on (N, C, ...) channels."""
    known = type(module).forward is nn.GroupNorm.forward or (
        _qualified_name(type(module)) in _GROUP_NORMS and not getattr(module, "_fast_norm", False))
    return (known and _epilogue_with_parameters(module) is None and len(shape) >= 2
            and shape[1] == module.num_channels)


def _adopted_norm_kind(module: Optional[nn.Module], shape) -> Optional[str]:
    """"layernorm", "groupnorm" or "grn" for a norm over the channels of (N, C, ...) that
    adjoin rebuilds as a layer, None for anything else."""
    if isinstance(module, nn.LayerNorm) and _adopts_layer_norm(module, shape, channels_last=False):
        return "layernorm"
    if isinstance(module, nn.GroupNorm) and _adopts_group_norm(module, shape):
        return "groupnorm"
    if _adopts_grn(module, shape, channels_last=False):
        return "grn"
    return None


# ConvNeXt-V2's Global Response Normalization, adopted as a layer (AdjoinedGlobalResponseNorm):
# traced through, its mean over the channels and its added bias would leave its group
# unsearched by DAN (a mask's zeros would count in the mean, the bias fill masked channels).
_GRN = "timm.layers.grn.GlobalResponseNorm"


def _adopts_grn(module: Optional[nn.Module], shape, channels_last: bool) -> bool:
    """Whether ``module`` is timm's GlobalResponseNorm on the channels of its (N, H, W, C)
    input when ``channels_last``, else of its (N, C, H, W) input."""
    if module is None or _qualified_name(type(module)) != _GRN or len(shape) != 4:
        return False
    axis = -1 if channels_last else 1
    return module.channel_dim in (axis, axis % 4) and shape[axis] == module.weight.numel()


def _record_layer_norm(result: _Analysis, node: torch.fx.Node, x: _Channels, where: str,
                       kind: str = "layernorm") -> None:
    """A LayerNorm (or GroupNorm, or GRN) over the channels: each network normalises its own. Its
    groups stay searchable: a DAN search normalises each width choice's leading channels
    (anfast.dan.gates), as the student of that width does. Over a concat the student's
    channels must be the concat's leading ones: the parts before the last keep full width."""
    if x is None or x.features_per_channel != 1:
        raise _Unfollowable(_node_shape(node.args[0]), after=_node_shape(node))
    if len(x.parts) > 1:
        label = {"layernorm": "LayerNorm", "groupnorm": "GroupNorm", "grn": "GRN"}[kind]
        _keep_full_width(_Channels(x.parts[:-1]), f"channels of a part before the last of a concat that the {label} "
                         f"{where} normalises: each network normalises the concat's leading channels, so only its "
                         "last part shrinks")
    result.channels[node] = x
    _record_layer(result, node, kind, x, x, where)


def _acts_per_element(node: torch.fx.Node, shape, inputs, module: Optional[nn.Module]) -> bool:
    """Whether ``node`` maps its one tensor input element by element (an activation, a
    dropout, a scale by a number): the shape kept, no dim argument, no parameters."""
    along_an_axis = (any(k in node.kwargs for k in ("dim", "dims", "axis")) or hasattr(module, "dim")
                     or any(not isinstance(a, (numbers.Number, torch.fx.Node)) for a in node.args[1:])
                     or any(_in_table(node.target, table) for table in (_MIXING, _REORDERING, _SLICING)))
    has_parameters = module is not None and any(True for _ in module.parameters())
    return len(inputs) == 1 and tuple(shape) == tuple(_node_shape(inputs[0])) and not along_an_axis \
        and not has_parameters


def _follow_channels_last(node, shape, inputs, module, where, result: _Analysis, new_dim) -> None:
    """An op on a per-network (N, H, W, C) tensor (ConvNeXt's block between its permutes):
    Linear layers and a LayerNorm over the channels are adjoined there, activations and
    elementwise ops between such tensors pass, ``permute(0, 3, 1, 2)`` returns the
    channels to axis 1; anything else runs whole (``_Unfollowable``)."""
    x_node = next(n for n in inputs if n in result.channels_last)
    x, x_shape = result.channels[x_node], _node_shape(x_node)
    function = node.target if node.op in ("call_function", "call_method") else None
    if function in (torch.permute, "permute") and _permutation(node) == (0, 3, 1, 2):
        result.channels[node] = x
        return
    result.channels_last.add(node)
    if isinstance(module, nn.Linear):
        _check_layer_class(module, where)
        result.channels[node] = _Channels((new_dim(module.out_features, producer=node.target),))
        _record_layer(result, node, "linear", x, result.channels[node], where)
        return
    if isinstance(module, nn.LayerNorm) and _adopts_layer_norm(module, shape, channels_last=True):
        _record_layer_norm(result, node, x, where)
        return
    if _adopts_grn(module, shape, channels_last=True):
        _record_layer_norm(result, node, x, where, kind="grn")
        return
    if function in _ELEMENTWISE and tuple(shape) == tuple(x_shape):
        for other in inputs:
            other_shape = _node_shape(other)
            if other in result.channels_last and tuple(other_shape) == tuple(shape):
                for a, b in zip(x.parts, result.channels[other].parts):
                    _union(a, b, where)
            elif other in result.shared and other_shape and other_shape[-1] == shape[-1] > 1:
                vector = result.vectors.get(other)
                if vector is not None and vector[1] == len(other_shape) - 1 and len(x.parts) == 1:
                    _union(vector[0], x.parts[0], where)  # a layer scale (C,): its leading slice per student
                else:
                    _keep_full_width(x, f"channels of {other.target if other.op == 'get_attr' else other.name} "
                                        f"{tuple(other_shape)}")
            elif other not in result.shared or (other_shape and other_shape[-1] not in (1, shape[-1])):
                raise _Unfollowable(x_shape, other_shape, after=shape)
        result.channels[node] = x
        return
    if _acts_per_element(node, shape, inputs, module):
        result.channels[node] = x
        return
    raise _Unfollowable(x_shape, after=shape, on="channels-last ")


# Views of a map (N, C, ...) as (N, 1, C, ...), the channels on axis 2 (ECA, GC).
_SEQUENCE_VIEWS = {"view", "reshape", torch.reshape, "unsqueeze", torch.unsqueeze}


def _follow_sequence(node, shape, inputs, module, where, result: _Analysis) -> bool:
    """An op on a per-network (N, 1, C, ...) view whose axis 2 holds the channels: a
    Conv1d of one channel sliding along them ((N, 1, C): ECA's gate) keeps the view
    (True); so do an op that acts on each element (an activation: no dim argument, the
    shape kept) and a matmul that pools the rest per channel ((N, 1, C, H * W) @
    (N, 1, H * W, 1): GC's attention pooling); a view back to (N, C, 1, 1) or (N, C)
    returns the channels to axis 1 (False); anything else runs whole (``_Unfollowable``).

    Each network convolves or pools its own channels (the student's last ones next to the
    Conv1d's zero padding), as the exported student does; a DAN mask's zeros beyond a
    student's width are that padding too, so the groups stay searched. The Conv1d's and
    the matmul's FLOPs per channel go to ``result.channel_ops`` for DAN's cost model.
    """
    x_shape, sequences = _node_shape(inputs[0]), result.sequences
    if isinstance(module, nn.Conv1d):
        if (module.in_channels, module.out_channels, module.padding_mode) != (1, 1, "zeros") or tuple(shape) != tuple(x_shape):
            raise _Unfollowable(x_shape, after=shape, on="channels on axis 2 ", detail=f" ({module.in_channels} in, "
                                f"{module.out_channels} out, padding_mode={module.padding_mode!r})")
        result.channel_ops[node] = 2 * module.kernel_size[0]  # one in, one out channel: 2 k per position
        return True
    if (len(inputs) == 1 and len(shape) >= 2 and shape[0] == x_shape[0] and shape[1] == x_shape[2]
            and math.prod(shape[2:]) == math.prod(x_shape[3:]) == 1
            and (node.target in _SEQUENCE_VIEWS or node.target in _FLATTEN)):
        return False
    if (node.target in (operator.matmul, torch.matmul, "matmul") and len(inputs) == 2
            and inputs[0] in sequences and inputs[1] not in sequences and _node_shape(inputs[1])[-1] == 1
            and tuple(shape[:3]) == tuple(x_shape[:3])):
        # Each channel's row weighted alone: 2 K FLOPs per output element of the channel.
        result.channel_ops[node] = 2 * x_shape[-1] * math.prod(shape[3:])
        return True
    if _acts_per_element(node, shape, inputs, module):
        return True
    raise _Unfollowable(x_shape, after=shape, on="channels on axis 2 ")


def _in_table(target: Any, table: Mapping) -> bool:
    """``target in table``, False for an unhashable target (a callable object)."""
    try:
        return target in table
    except TypeError:
        return False


# Reductions over the axes their ``dim`` names (every axis when it is left out): {op:
# the position of dim after the input}.
_REDUCING = {
    **{op: 1 for name in ("mean", "nanmean", "sum", "nansum", "prod", "amax", "amin", "max", "min", "std", "var",
                          "std_mean", "var_mean", "logsumexp", "median", "nanmedian", "argmax", "argmin", "any",
                          "all", "count_nonzero")
       for op in (getattr(torch, name), name)},
    **{op: 2 for op in (torch.norm, "norm", torch.linalg.vector_norm, torch.linalg.norm)},
}
# Ops that keep the channel count but compute each channel from all of them along
# ``dim``: {op: (the position of dim after the input, the axis when it is left out)}.
_MIXING = {
    **{op: (1, None) for op in (torch.softmax, torch.log_softmax, "softmax", "log_softmax", torch.nn.functional.softmax,
                                torch.nn.functional.log_softmax, torch.nn.functional.softmin, torch.special.softmax,
                                torch.special.log_softmax, torch.cumsum, "cumsum", torch.cumprod, "cumprod",
                                torch.logcumsumexp, "logcumsumexp")},
    torch.nn.functional.normalize: (2, 1),
}


def _dim_argument(node: torch.fx.Node, position: int) -> Any:
    """An op's dim: by keyword (``dim``, or numpy's ``axis``, which torch takes too) or at ``position``."""
    for keyword in ("dim", "axis"):
        if keyword in node.kwargs:
            return node.kwargs[keyword]
    return node.args[position] if len(node.args) > position else None


def _reduced_axes(node: torch.fx.Node, ndim: int) -> Optional[set]:
    """The axes ``node`` reduces if it is a reduction (``x.mean(1)``, ``torch.amax(x, (2, 3))``,
    ``torch.max(x, 1)``, ``x.sum()``), else None: None too for ``torch.max(x, y)`` (an
    elementwise max) and for a dim computed in forward."""
    if node.op not in ("call_function", "call_method") or "other" in node.kwargs:
        return None
    if not _in_table(node.target, _REDUCING):
        return None
    dims = _dim_argument(node, _REDUCING[node.target])
    if isinstance(dims, bool):  # torch.std(x, True): unbiased, over every axis
        dims = None
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return set(range(ndim))
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return {d % ndim for d in dims}


# Reductions and mixing ops along the channels whose student a DAN search computes per width
# choice on its leading channels: one tensor in, one floating tensor out (not argmax: indices)...
_PER_WIDTH = {
    **{op: None for name in ("mean", "nanmean", "sum", "nansum", "prod", "amax", "amin", "std", "var", "logsumexp")
       for op in (getattr(torch, name), name)},
    **{op: None for op in (torch.norm, "norm", torch.linalg.vector_norm)},
    **{op: None for op in _MIXING},
}
# ... or (values, indices) of which the model reads the values alone (torch.max(x, 1)[0],
# x.min(1).values): the values are mixed, the indices are the widest choice's.
_PER_WIDTH_VALUES = {op: None for name in ("max", "min", "median", "nanmedian") for op in (getattr(torch, name), name)}


def _reduces_per_width(op: torch.fx.Node, returns_tuple: bool, inputs, x: Optional[_Channels],
                       result: _Analysis) -> bool:
    """Whether ``op``, which reduces or mixes the channels of ``x``, is one function or
    method on one per-network tensor (its first argument) over one width group, with one
    floating result or (``returns_tuple``) values the model reads alone, so that a DAN
    search can compute it on each width choice's leading channels (StudentReduction)."""
    table = _PER_WIDTH_VALUES if returns_tuple else _PER_WIDTH
    return (_in_table(op.target, table) and len(inputs) == 1 and _acts_on_one_group(op, inputs, x, result)
            and (not returns_tuple or all(_reads_values(user) for user in op.users)))


def _acts_on_one_group(op: torch.fx.Node, inputs, x: Optional[_Channels], result: _Analysis) -> bool:
    """Whether ``op`` is a function or method call whose first argument is a per-network
    tensor (``inputs[0]``) whose channels ``x`` are one width group's: what a
    StudentReduction computes per width choice."""
    return (op.op in ("call_function", "call_method") and bool(op.args) and bool(inputs)
            and op.args[0] is inputs[0] and inputs[0] not in result.shared and x is not None
            and len(x.parts) == 1 and x.features_per_channel == 1)


def _shifts(node: torch.fx.Node, shape, inputs, in_channels, result: _Analysis) -> bool:
    """Whether ``node`` adds to (or subtracts from) one per-network map of one width group,
    its first argument, a nonzero number or a tensor equal in every network that
    broadcasts along the channels (not a per-channel vector: _check_vector_uses marks
    those), so that a DAN search computes it per width choice (StudentReduction)."""
    if not (_in_table(node.target, SHIFTING_OPS) and in_channels
            and _acts_on_one_group(node, inputs, in_channels[0], result)):
        return False
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if a is not None]
    shifted = False
    for other in others:
        if isinstance(other, numbers.Number):
            shifted = shifted or other != 0
            continue
        if not isinstance(other, torch.fx.Node) or other not in result.shared or other in result.vectors:
            return False
        other_shape = _node_shape(other)
        axis = len(other_shape or ()) - len(shape) + 1  # right-aligned broadcasting
        if other_shape is None or (0 <= axis < len(other_shape) and other_shape[axis] != 1):
            return False
        shifted = True
    return shifted


def _reads_values(node: torch.fx.Node) -> bool:
    """``node`` is ``t[0]`` or ``t.values`` of a (values, indices) tuple ``t``."""
    return node.op == "call_function" and ((node.target is operator.getitem and node.args[1] == 0)
                                           or (node.target is getattr and node.args[1] == "values"))


def _mixes_channels(node: torch.fx.Node, module: Optional[nn.Module], ndim: int) -> bool:
    """Whether ``node`` computes each channel from every channel while keeping their
    count: a softmax, cumsum or F.normalize along axis 1, nn.Softmax(dim=1), nn.Softmax2d,
    a group norm, a layer norm whose normalized shape reaches axis 1."""
    if isinstance(module, nn.Softmax2d):
        return ndim == 4  # over axis -3: the channels of (N, C, H, W)
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        dim = module.dim if module.dim is not None else (0 if ndim in (0, 1, 3) else 1)
        return dim % ndim == 1
    if isinstance(module, nn.GroupNorm) or node.target in (torch.nn.functional.group_norm, torch.group_norm):
        return True
    if isinstance(module, nn.LayerNorm) or node.target in (torch.nn.functional.layer_norm, torch.layer_norm):
        shape = module.normalized_shape if module is not None else (
            node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else ()))
        # A shape computed in forward (x.shape[1:]) may reach axis 1: it counts.
        return isinstance(shape, torch.fx.Node) or (isinstance(shape, (tuple, list, torch.Size))
                                                     and len(shape) >= ndim - 1)
    if node.op not in ("call_function", "call_method"):
        return False
    if not _in_table(node.target, _MIXING):
        return False
    position, default = _MIXING[node.target]
    dim = _dim_argument(node, position)
    if dim is None:  # F.softmax's implicit dim: 0 for 0-, 1- and 3-d inputs, else 1
        dim = default if default is not None else (0 if ndim in (0, 1, 3) else 1)
    return isinstance(dim, int) and dim % ndim == 1


def _record_layer(result: _Analysis, node: torch.fx.Node, kind: str, x: _Channels, y: _Channels, where: str) -> None:
    """``result.layers[name] = (kind, x, y)``. A layer called again (shared weights) must
    read a tensor of the same kind (equal in every network, or each network's own) and the
    same channel layout: its calls then share their width groups, or the student would
    run every call at the widths of the last one."""
    previous = result.layers.get(node.target)
    reads_shared = node.args[0] in result.shared
    if previous is None:
        result.layers[node.target] = (kind, x, y)
        result.reads_shared[node.target] = reads_shared
        return
    _, before_x, before_y = previous
    if result.reads_shared[node.target] != reads_shared:
        raise AdjoinError(f"{where}: called on the image (or a tensor equal in every network) and again on a "
                          f"tensor each network computes; anfast cannot give one layer both; use two layers")
    for before, now in ((before_x, x), (before_y, y)):
        if [p.size for p in before.parts] != [p.size for p in now.parts] or (
                before.features_per_channel != now.features_per_channel):
            raise AdjoinError(f"{where}: called again on channels laid out otherwise (parts "
                              f"{[p.size for p in before.parts]}, then {[p.size for p in now.parts]}); anfast "
                              f"adjoins a layer called on one channel layout; use two layers")
        for a, b in zip(before.parts, now.parts):
            _union(a, b, where)


def _concat_tensors(node: torch.fx.Node) -> Sequence[torch.fx.Node]:
    """torch.cat's tensors, given by position or as ``tensors=``."""
    return node.kwargs["tensors"] if "tensors" in node.kwargs else node.args[0]


def _concat_dim(node: torch.fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim if dim >= 0 else dim + len(_node_shape(node))


def _follow_simple_op(node, shape, inputs, in_channels, where, vectors: Mapping) -> Optional[_Channels]:
    if node.target in _ELEMENTWISE:
        meeting = [(n, c) for n, c in zip(inputs, in_channels)
                   if c is not None and len(_node_shape(n)) >= 2 and _node_shape(n)[1] == shape[1] > 1]
        if not meeting:
            return in_channels[0] if in_channels else None
        first = meeting[0][1]
        for _, other in meeting[1:]:
            if ([p.size for p in first.parts] != [p.size for p in other.parts]
                    or first.features_per_channel != other.features_per_channel):
                # A concat's parts met by one map (MixNet's gate on its mixed convs): a
                # student slice of each part is no slice of the map, so both keep full width.
                why = f"channels {where} joins in different layouts (a concat's parts and a single map)"
                _keep_full_width(first, why)
                _keep_full_width(other, why)
                continue
            for a, b in zip(first.parts, other.parts):
                _union(a, b, where)
        # A lower-rank tensor that broadcasts along the channel axis (a layer scale of shape
        # (C, 1, 1)): a per-channel vector's leading slice serves each student; any other
        # has no student slice, and its channels keep full width.
        for other, channels in zip(inputs, in_channels):
            other_shape = _node_shape(other)
            if channels is None and len(other_shape) == len(shape) and other_shape[1] == shape[1] > 1:
                # torch.ones(n, 128, 1, 1) made in forward: the count is the model's code's
                _keep_full_width(first, f"channels of {other.name} {tuple(other_shape)}, which {where} meets")
            if other_shape is None or len(other_shape) >= len(shape):
                continue
            axis = len(other_shape) - len(shape) + 1  # right-aligned broadcasting
            if axis < 0 or other_shape[axis] != shape[1]:
                continue
            vector = vectors.get(other)
            if vector is not None and vector[1] == axis and len(first.parts) == 1 and first.features_per_channel == 1:
                _union(vector[0], first.parts[0], where)
            else:
                _keep_full_width(first, f"channels of {other.target} {tuple(other_shape)}")
        return first
    # flatten / view / reshape
    x, x_shape = in_channels[0], _node_shape(inputs[0])
    if x is None:
        return None
    if (len(shape) == len(x_shape) and shape[1] == x_shape[1]) or (
            len(shape) >= 3 and tuple(shape[:2]) == tuple(x_shape[:2])):  # (N, C, H, W) -> (N, C, H * W)
        return x
    if len(shape) == 2 and shape[0] == x_shape[0] and shape[1] == math.prod(x_shape[1:]):
        return _Channels(x.parts, x.features_per_channel * math.prod(x_shape[2:]))
    raise _Unfollowable(x_shape, after=shape)  # (N, 2C, H, W) -> (N, 2, C, H, W), say


# Ops that size a tensor: x.view(n, c, -1), x.expand(n, c, h, w), x.new_zeros(n, c, h, w).
_SIZING = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty"}


def _check_sizes(node: torch.fx.Node, x: torch.fx.Node, where: str, result: _Analysis, axis: int = 1,
                 channels: Optional[_Channels] = None) -> None:
    """A view, reshape, expand or ``new_zeros`` of ``x`` that follows its channels, sized on
    axis 1 by a number in the model's code (``x.view(n, self.dim, -1)``: fx records
    ``self.dim`` as one), keeps them at full width: the exported student runs that code
    too, and fewer channels would not fit. Sized by another tensor's channel count (``y.view(n,
    z.shape[1] // 3, h, w)``), it is checked once every group is known
    (``_check_size_reads``). -1 and ``x``'s own count follow the channels. A per-channel
    vector's view gives its channels' ``axis`` and ``channels``."""
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    size = sizes[axis] if len(sizes) > axis else None
    if isinstance(size, int) and size != -1:
        _keep_full_width(channels or result.channels[x], f"channels {where} sizes as {size} in the model's code")
    elif isinstance(size, torch.fx.Node):
        read = [t for t in _channel_counts_read([size]) if t is not x and result.channels.get(t) is not None]
        if read:
            result.size_reads.append((channels or result.channels[x], read, where))


def _check_size_reads(result: _Analysis) -> None:
    """A tensor sized by the channel count of tensors in other width groups keeps its
    channels, and theirs, at full width: the groups' student widths need not keep the
    model's ratio (y's 16 = z's 48 // 3 at full width only)."""
    for channels, read, where in result.size_reads:
        own = {p.root() for p in channels.parts}
        others = [t for t in read if {p.root() for p in result.channels[t].parts} != own]
        if others:
            for sized in (channels, *(result.channels[t] for t in others)):
                _keep_full_width(sized, f"channels {where} sizes by the channel count of {others[0].name}")


def _keep_full_width(channels: _Channels, why: str) -> None:
    """Fix every width group of ``channels`` at full width (``why`` names the reason)."""
    for part in channels.parts:
        root = part.root()
        root.fixed = root.fixed or why


def _leaves_region(module: Optional[nn.Module]) -> bool:
    """Whether a layer ends a region run whole: a conv or linear makes new channels of
    its full-width input, a batch norm keeps each network's statistics apart."""
    return isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d))


def _run_whole(node, shape, inputs, why: str, module: Optional[nn.Module], where: str, result: _Analysis) -> None:
    """``node`` runs in every network as in the model: its inputs' channels keep full width
    (``why``), and so do the ops after it up to a layer that leaves the region
    (``_leaves_region``), whose input is then a full-width group of its own. The exported
    student, the model's own class, runs it the same way."""
    if module is not None:
        _note_running_stats(node, module, result.statistics)
    for n in inputs:
        if result.channels.get(n) is not None:
            _keep_full_width(result.channels[n], why)
        if n in result.vectors:  # a layer scale read there: whole
            _keep_full_width(_Channels((result.vectors[n][0],)), why)
    for n in _channel_counts_read(node.all_input_nodes):  # out.reshape(B, C, H, W), C from x.shape: x whole
        if result.channels.get(n) is not None:
            _keep_full_width(result.channels[n], f"channels whose count {where} reads, in a region run whole: {why}")
    result.whole[node] = why
    result.sequences.discard(node)
    result.channels_last.discard(node)
    result.channelless.discard(node)
    result.channels.pop(node, None)


def _channel_counts_read(nodes: Sequence[torch.fx.Node]) -> list[torch.fx.Node]:
    """The tensors whose channel count the non-tensor ``nodes`` (an op's size arguments)
    are computed from (``x.shape[1]``, ``x.size(1)``, ``x.size()``, ``x.numel()``, through
    int arithmetic); sizes of other axes (``x.shape[2]``, ``x.shape[2:]``) do not count."""
    found, seen = [], set()

    def visit(n: torch.fx.Node, axis: Any = None) -> None:
        key = (n, (axis.start, axis.stop, axis.step) if isinstance(axis, slice) else axis)  # slices: unhashable
        if key in seen:
            return
        seen.add(key)
        shape = _node_shape(n)
        if shape is not None:  # a tensor: its sizes were read
            if isinstance(axis, slice):
                reads = 1 in range(len(shape))[axis]  # x.shape[2:]: no
            else:
                reads = not isinstance(axis, int) or axis % max(len(shape), 1) == 1  # all, x.shape[1], [-3]
            if reads:
                found.append(n)
            return
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
            visit(n.args[0], n.args[1])  # x.shape[1]: the shape's item 1
            return
        if n.op == "call_method" and n.target == "size" and len(n.args) > 1:
            visit(n.args[0], n.args[1])
            return
        if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
            visit(n.args[0], axis)
            return
        for m in n.all_input_nodes:
            visit(m)  # int arithmetic, x.size(), x.numel(): every size it reads

    for n in nodes:
        if _node_shape(n) is None:
            visit(n)
    return found


def _note_running_stats(node: torch.fx.Node, module: nn.Module, statistics: set) -> bool:
    """Whether ``module``, which every network calls, holds running statistics (a batch norm
    inside a block timm keeps whole); if so it is added to ``statistics``, and each student
    gets its own copy of its buffers (``_build``): each network's call in train mode would
    otherwise update the one set, the students' activations mixed into the base's."""
    holds = any(isinstance(child, nn.modules.batchnorm._NormBase) and child.track_running_stats
                for child in module.modules())
    if holds:
        statistics.add(node.target)
    return holds


# Ops that keep the channel count but move channels along axis 1: a student's leading
# channels after them are not its leading channels before them. The value says where the
# op takes its dims (position after the input, keyword), or None for "always axis 1".
_REORDERING = {
    torch.flip: (1, "dims"), "flip": (1, "dims"), torch.roll: (2, "dims"), "roll": (2, "dims"),
    torch.index_select: (1, "dim"), "index_select": (1, "dim"), torch.gather: (1, "dim"),
    "gather": (1, "dim"), torch.take_along_dim: (2, "dim"), "take_along_dim": (2, "dim"),
    torch.fliplr: None, "fliplr": None, torch.channel_shuffle: None,
    torch.native_channel_shuffle: None,
    **{op: (1, "dim") for name in ("scatter", "scatter_add", "scatter_reduce", "index_copy", "index_add")
       for op in (getattr(torch, name), name, name + "_")},
    torch.sort: (1, "dim"), "sort": (1, "dim"), torch.argsort: (1, "dim"), "argsort": (1, "dim"),
    torch.topk: (2, "dim"), "topk": (2, "dim"),
}
# Of those, the ones whose dim defaults to the last axis (axis 1 of an (N, C) tensor).
_LAST_AXIS_BY_DEFAULT = {torch.sort, "sort", torch.argsort, "argsort", torch.topk, "topk"}


def _channel_index(node: torch.fx.Node, ndim: int) -> Any:
    """What the getitem ``node`` (``x[:, 2:5]``, ``x[..., perm, :, :]``) indexes axis 1
    with: ``slice(None)`` where it leaves that axis whole."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if index and index[0] is Ellipsis:  # x[..., i] indexes axes counted from the end
        index = (slice(None),) * (ndim + 1 - len(index)) + index[1:]
    return index[1] if len(index) > 1 else slice(None)


# Ops that take part of the channel axis when their dim is 1 (each defaults to axis 0):
# {op: the position of dim after the input}.
_SLICING = {
    **{op: 2 for name in ("split", "split_with_sizes", "tensor_split", "chunk")
       for op in (getattr(torch, name), name)},
    torch.narrow: 1, "narrow": 1,
}


def _slices_channels(node: torch.fx.Node, ndim: int) -> bool:
    """Whether ``node`` takes part of the channel axis: a split, chunk or narrow along
    it, ``x[:, :k]``."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is operator.getitem:
        index = _channel_index(node, ndim)
        return isinstance(index, slice) and index != slice(None)
    if not _in_table(node.target, _SLICING):
        return False
    dim = _dim_argument(node, _SLICING[node.target])
    dim = 0 if dim is None else dim
    # A dim computed in forward (x.dim() - 3) is a node: it may be axis 1, so it counts.
    return isinstance(dim, torch.fx.Node) or (isinstance(dim, int) and dim % ndim == 1)


def _reorders_channels(node: torch.fx.Node, module: Optional[nn.Module], ndim: int) -> bool:
    """Whether ``node`` moves channels along axis 1 (a flip, roll, gather or shuffle on it)."""
    if isinstance(module, nn.ChannelShuffle):
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is operator.getitem:  # x[:, perm]: an index tensor or list on axis 1
        return isinstance(_channel_index(node, ndim), (torch.fx.Node, torch.Tensor, list, tuple))
    if not _in_table(node.target, _REORDERING):
        return False
    where = _REORDERING[node.target]
    if where is None:
        return True
    position, keyword = where
    dims = node.kwargs.get(keyword, node.args[position] if len(node.args) > position else None)
    if node.target in (torch.flip, "flip") and len(node.args) > 2:  # x.flip(1, 2)
        dims = node.args[1:]
    if dims is None and node.target in _LAST_AXIS_BY_DEFAULT:
        dims = -1
    if dims is None:
        return node.target in (torch.roll, "roll")  # roll without dims rolls the flattened tensor
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    # A dim computed in forward (x.dim() - 3) is a node: it may be axis 1, so it counts.
    return any(d % ndim == 1 if isinstance(d, int) else isinstance(d, torch.fx.Node) for d in dims)


def _follow_generic(node, shape, inputs, in_channels, where, module: Optional[nn.Module],
                    statistics: set) -> Optional[_Channels]:
    """Ops anfast has no rule for: channel-preserving ones pass through, others run whole
    (``_Unfollowable``); a module with running statistics is added to ``statistics``."""
    carried = [(n, c) for n, c in zip(inputs, in_channels) if c is not None]
    if not carried:
        return None
    # The input whose channel count the output keeps (x in gate.expand_as(x)), else the first.
    source, channels = next(((n, c) for n, c in carried if len(_node_shape(n)) == len(shape) >= 2
                             and _node_shape(n)[1] == shape[1]), carried[0])
    source_shape = _node_shape(source)
    if len(shape) == len(source_shape) and len(shape) >= 2 and shape[1] == source_shape[1]:
        if len(carried) > 1:
            for _, other in carried[1:]:
                if other.size == channels.size and other is not channels:
                    for a, b in zip(channels.parts, other.parts):
                        _union(a, b, where)
        # A flip, roll, gather or shuffle along the channels has no student slice: the
        # channels keep full width, where the student's channels are the base's.
        if shape[1] > 1 and _reorders_channels(node, module, len(shape)):
            _keep_full_width(channels, f"channels that {where} reorders")
        # A parameter or buffer the op reads per channel (timm's blur filter (C, 1, 3, 3) in
        # F.conv2d) has no student slice: these channels keep full width.
        for other in inputs:
            other_shape = _node_shape(other)
            if other.op == "get_attr" and other_shape is not None and shape[1] > 1 and shape[1] in other_shape:
                _keep_full_width(channels, f"channels of {other.target} {tuple(other_shape)}")
        # So does a module with parameters or running statistics anfast does not slice (a
        # PReLU, a block timm keeps whole): every network runs it as the model does.
        if module is not None:
            held = "running statistics" if _note_running_stats(node, module, statistics) else "parameters"
            if held == "running statistics" or any(True for _ in module.parameters()):
                _keep_full_width(channels, f"channels of {where}, a {type(module).__name__} with {held} "
                                           "anfast does not slice")
        return channels
    if len(shape) < 2 or (len(source_shape) >= 2 and shape[1] != source_shape[1]):
        raise _Unfollowable(source_shape, after=shape)
    return channels


# ----------------------------------------------------------------------------- policy


def _as_alphas(value: Any, alphas: tuple[float, ...], where: str) -> tuple[float, ...]:
    if value is True:
        return alphas
    if value is False or value is None:
        return (1.0,) * len(alphas)
    def number(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise AdjoinError(f"policy for {where}: {value!r} is not an alpha; give a number >= 1, a tuple of "
                              f"one per student, True (shrink by alpha) or False (keep full width)")
        return float(v)

    if isinstance(value, numbers.Real):
        result = (number(value),) * len(alphas)
    else:
        try:
            result = tuple(number(v) for v in value)
        except TypeError:  # not iterable
            number(value)
            raise
        if len(result) != len(alphas):
            raise AdjoinError(f"policy for {where}: {len(result)} alphas given for {len(alphas)} students")
        if list(result) != sorted(result):  # the students are nested: each no wider than the one before
            raise AdjoinError(f"policy for {where}: alphas {result} must not decrease from one student to the "
                              f"next, as alpha={alphas} orders the students")
    if not all(math.isfinite(a) and a >= 1 for a in result):
        raise AdjoinError(f"policy for {where}: alpha {result} must be finite and >= 1 (the student is "
                          f"1/alpha wide)")
    return result


def _layer_alphas(policy: Policy, name: str, module: nn.Module, alphas: tuple[float, ...]) -> tuple[float, ...]:
    if policy == "paper":
        shrink = isinstance(module, nn.Conv2d) and min(module.in_channels, module.out_channels) > PAPER_MIN_CHANNELS
        return _as_alphas(shrink, alphas, name)
    if policy == "all":
        return alphas
    if isinstance(policy, Mapping):
        return _as_alphas(policy.get(name, 1), alphas, name)
    if callable(policy):
        return _as_alphas(policy(name, module), alphas, name)
    raise AdjoinError(f"policy={policy!r}: use 'paper', 'all', a dict {{module name: alpha}} or a callable")


def _check_alpha(alpha: Alpha) -> tuple[float, ...]:
    try:
        alphas = (alpha,) if isinstance(alpha, numbers.Real) else tuple(alpha)
    except TypeError:  # not a number, not iterable: a 0-d tensor, say
        alphas = ()
    if not alphas or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) and math.isfinite(a)
                             and a >= 1 for a in alphas):
        raise AdjoinError(f"alpha={alpha!r}: give a number >= 1 (the student is 1/alpha as wide) or a tuple of them")
    if list(alphas) != sorted(alphas):
        raise AdjoinError(f"alpha={alpha!r}: nested students go from widest to narrowest; sort the tuple ascending")
    return tuple(float(a) for a in alphas)


# ----------------------------------------------------------------------------- network


class AdjoinedNetwork(torch.fx.GraphModule):
    """A traced CNN whose forward returns the base's and every student's outputs.

    Parameters keep the original model's names (``layer1.0.conv1.weight``); student
    batch norms add ``*.student_norms.{s}.*``, and the students' running statistics of
    modules every network runs whole ``student_statistics.{s}.*``. ``width_groups`` and ``layer_widths``
    describe the students; export them with :func:`anfast.export_student`.
    """

    width_groups: list[WidthGroup]
    layer_widths: dict[str, LayerWidths]
    # Per-channel parameters each student reads the leading slice of (ConvNeXt's gamma):
    # {name: (the axis of its channels, its width group's name)}.
    channel_vectors: dict[str, tuple[int, str]]
    # Ops that act along a group's channels on ECA's and GC's (N, 1, C, ...) views, whose
    # FLOPs grow with its width (DAN's cost model counts them): {node name: ((group name,
    # FLOPs per channel at batch 1), ...)}, one pair per part of a concat's channels.
    channel_ops: dict[str, tuple[tuple[str, int], ...]]
    # The first student's ops over a shrinkable group's channels on axis 1 (CBAM's channel
    # mean and max), StudentReduction layers a DAN search sets: {module name: group name}.
    channel_reductions: dict[str, str]
    # Modules every network runs whole that hold running statistics (a batch norm inside
    # a block timm keeps whole): student s runs its copy, ``student_statistics.{s}.{name}``,
    # whose buffers are its own and whose parameters are the base's.
    statistics_modules: tuple[str, ...]
    alphas: tuple[float, ...]
    source: dict

    _EXTRA_ATTRIBUTES = ("width_groups", "layer_widths", "channel_vectors", "channel_ops", "channel_reductions",
                         "statistics_modules", "alphas", "source", "_skeleton")

    def __deepcopy__(self, memo):
        # GraphModule's deepcopy rebuilds from code and drops attributes it does not know,
        # and state that its code never reads.
        result = super().__deepcopy__(memo)
        for name in self._EXTRA_ATTRIBUTES:
            result.__dict__[name] = copy.deepcopy(self.__dict__[name], memo)
        _register_unread(result, copy.deepcopy(self._unread_state(), memo))
        result.__dict__["_aliases"] = self.__dict__.get("_aliases", ())
        return result

    def __reduce__(self):
        # GraphModule pickles (torch.save too) as a plain GraphModule rebuilt from its code:
        # rebuild that, then this class around it with the attributes it does not know.
        rebuild, args = super().__reduce__()[:2]
        extras = {name: self.__dict__[name] for name in self._EXTRA_ATTRIBUTES}
        extras["_aliases"] = self.__dict__.get("_aliases", ())
        return (_unpickle_adjoined, (rebuild, args, extras, self._unread_state()))

    def _unread_state(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """{name: (tensor, persistent)} of the state that forward never reads."""
        return {name: (self.get_buffer(name), persistent) for name, persistent in self.__dict__.get("_unread", ())}

    @property
    def num_students(self) -> int:
        return len(self.alphas)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base network's state, loadable into the original architecture.

        It carries the original classes' state_dict versions (``_metadata``), which some
        ``_load_from_state_dict`` methods require (torchvision's MNASNet)."""
        # The original's own keys only: tracing adds the students' norms and, for a tensor
        # made in forward (torch.tensor(2.0)), a _tensor_constant buffer the original lacks.
        original = self.__dict__["_skeleton"].state_dict()
        own = self.state_dict()
        for alias, target in self.__dict__.get("_aliases", ()):  # a tied tensor: one tensor, two names
            if target in own:
                own[alias] = own[target]
        state = collections.OrderedDict((k, own[k]) for k in original if k in own)  # the original's order
        state._metadata = original._metadata
        return state

    def load_base_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint of the original architecture (a torchvision one, say) into the base.

        The students' batch norms start as slices of the loaded base's (affine parameters and
        running statistics), and their copies of the running statistics of modules every
        network runs whole as the base's, as when ``adjoin`` is given the trained model itself. Keys and
        shapes are checked first: a checkpoint that does not match raises ValueError and
        leaves the network as it was."""
        own = self.base_state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        resized = [f"{k} {tuple(state_dict[k].shape)} (the base: {tuple(own[k].shape)})" for k in own
                   if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(own[k].shape)]
        if missing or unexpected or resized:
            found = [f"{what} {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                     for what, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("other shapes", resized)) if keys]
            raise ValueError(f"state_dict does not match the base network, nothing was loaded: "
                             f"{'; '.join(found)}; give a checkpoint of the architecture adjoined "
                             f"(with its number of classes)")
        self.load_state_dict(state_dict, strict=False)
        for module in self.modules():
            if isinstance(module, AdjoinedBatchNorm2d):
                module.copy_base_to_students()
        with torch.no_grad():
            for name, s in itertools.product(self.statistics_modules, range(self.num_students)):
                own = self.get_submodule(f"{_STUDENT_STATISTICS}.{s}.{name}")
                for (_, base), (_, student) in zip(self.get_submodule(name).named_buffers(), own.named_buffers()):
                    student.copy_(base)

    def architecture(self) -> nn.Module:
        """A fresh, parameter-less (meta) copy of the original model class."""
        return copy.deepcopy(self.__dict__["_skeleton"])


def _unpickle_adjoined(rebuild, args, extras: dict, unread: Optional[dict] = None) -> "AdjoinedNetwork":
    """AdjoinedNetwork.__reduce__'s inverse: GraphModule's rebuild, as an AdjoinedNetwork."""
    rebuilt = rebuild(*args)
    network = AdjoinedNetwork(rebuilt, rebuilt.graph, class_name="AdjoinedNetwork")
    network.train(rebuilt.training)
    network.__dict__.update(extras)
    network.__dict__.setdefault("channel_vectors", {})  # pickled before vectors were sliced: none were
    network.__dict__.setdefault("channel_ops", {})  # pickled before they were counted: their groups unsearched
    network.__dict__.setdefault("channel_reductions", {})  # pickled before: its reduced groups were unsearched
    network.__dict__.setdefault("statistics_modules", ())  # pickled before they were kept apart: none were
    _register_unread(network, unread or {})
    return network


def adjoin(
    model: Union[nn.Module, str],
    alpha: Alpha = 4,
    policy: Policy = "paper",
    round_to: int = 8,
    *,
    share_affine: bool = False,
    input_size: Sequence[int] = (3, 224, 224),
    backend: Optional[str] = None,
    **model_kwargs,
) -> AdjoinedNetwork:
    """Turn a traceable CNN into an adjoined network (base + students sharing filters).

    Args:
        model: an nn.Module (copied, never modified), or a name built with
            ``model_kwargs`` by anfast.models.create_model: a torchvision name, an anfast
            one (``"xresnet50"``) or ``"timm:NAME"`` (timm, no weights).
        alpha: student shrink factor; a tuple (2, 4, 8) gives nested students.
        policy: which layers shrink: "paper" (convs with in and out channels > 64),
            "all" (every layer but the image input and the class output), a dict
            {module name: alpha | tuple | bool}, or a callable (name, module) -> same.
            A width group takes the smallest alpha of the layers that produce it.
        round_to: student widths are rounded up to multiples of this.
        share_affine: students use sliced base BatchNorm affine parameters.
        input_size: (C, H, W) of the example input used to trace shapes.
        backend: force a backend of anfast.ops.adjoined_conv2d for every conv.

    Returns:
        An AdjoinedNetwork; ``an(x)`` gives ``AdjoinedOutput(base, students)``.
    """
    alphas = _check_alpha(alpha)
    unknown = unknown_backend(backend)
    if unknown:
        raise AdjoinError(f"{unknown}, or leave it out for auto")
    source: dict = {}
    if isinstance(model, str):
        from anfast.models import create_model

        try:
            model, source = create_model(model, **model_kwargs)
        except ValueError as error:
            raise AdjoinError(f"model={model!r}: {error}") from None
    elif model_kwargs:
        raise TypeError(f"adjoin: unexpected keyword arguments {sorted(model_kwargs)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"adjoin: model must be an nn.Module or a model name, got {type(model).__name__}")
    source = source or {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    model = copy.deepcopy(model)

    try:
        traced = _trace(model)
    except AdjoinError:
        raise
    except Exception as error:  # fx raises many types; all mean "not traceable"
        raise AdjoinError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(error).__name__}: {error}. "
            "adjoin needs an fx-traceable model: avoid data-dependent control flow in forward, or "
            "mark such submodules as leaves (they then keep full width)"
        ) from error
    _propagate_shapes(traced, model, input_size)
    analysis = _analyse(traced, set(model.state_dict()))
    groups = _assign_widths(analysis, traced, policy, alphas, round_to)
    nothing_shrinks = _nothing_shrinks(list(groups.values()), traced, policy, alphas, type(model).__name__)
    network = _build(traced, analysis, groups, alphas, share_affine, backend)
    _keep_unread_state(network, model)
    network.alphas = alphas
    network.source = source
    network.width_groups = list(groups.values())
    if nothing_shrinks:
        warnings.warn(nothing_shrinks, UserWarning, stacklevel=2)
    skeleton = copy.deepcopy(model).to("meta")
    network.__dict__["_skeleton"] = skeleton  # not a submodule: no parameters, no state
    _check_students_run(network, model, input_size)
    network.train(model.training)
    return network


def _nothing_shrinks(groups: Sequence[WidthGroup], traced, policy, alphas, model_name: str) -> str:
    """The warning for students that all equal the base ("" when one shrinks): the
    policy shrinks no layer, or every layer it shrinks keeps full width for the model's
    structure (a ViT's tokens, say), named with why."""
    if all(a == 1 for a in alphas) or any(w != g.channels for g in groups for w in g.widths):
        return ""
    modules = dict(traced.named_modules())
    kept = [g for g in groups if g.fixed and g.fixed != "model output" and any(
        a > 1 for p in g.producers for a in _layer_alphas(policy, p, modules[p], alphas))]
    if kept:
        reasons = "; ".join(f"{g.name}: {g.fixed}" for g in kept[:3]) + ("; ..." if len(kept) > 3 else "")
        return (f"adjoin: no layer of {model_name} shrinks, so every student equals the base: the layers the "
                f"policy shrinks keep full width ({reasons}); `anfast info` lists every group kept and why")
    rule = (f" ('paper' shrinks convs whose in and out channels both exceed {PAPER_MIN_CHANNELS})"
            if policy == "paper" else "")
    return (f"adjoin: no layer of {model_name} shrinks under this policy{rule}, so every student equals the "
            f"base; use policy='all' or name the layers to shrink")


def _keep_unread_state(network: AdjoinedNetwork, model: nn.Module) -> None:
    """Parameters and buffers that forward never reads (a spare head, an unused index
    buffer) are not in the traced graph. Keep each under its own name, as a buffer of the
    same persistence: no gradient reaches them (DDP sees no unused parameter), and the
    base's state_dict, checkpoints and exports still hold the model's whole state. A name
    of a tensor the network holds under another name (``self.head = self.fc``) is kept as
    an alias of that name, never as a copy that would stop following training."""
    kept = {name for name, _ in network.named_parameters(remove_duplicate=False)}
    kept |= {name for name, _ in network.named_buffers(remove_duplicate=False)}
    persistent = set(model.state_dict(keep_vars=True))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    first_name: dict[int, str] = {}
    for name, tensor in sorted(tensors, key=lambda item: item[0] not in kept):  # kept names first
        first_name.setdefault(id(tensor), name)
    unread, aliases = {}, []
    for name, tensor in tensors:
        if name in kept:
            continue
        if first_name[id(tensor)] != name:
            aliases.append((name, first_name[id(tensor)]))
        else:
            unread[name] = (tensor.detach(), name in persistent)
    _register_unread(network, unread)
    network.__dict__["_aliases"] = tuple(aliases)


def _register_unread(network: AdjoinedNetwork, unread: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """Register ``{name: (tensor, persistent)}`` as buffers, making modules on the way."""
    for name, (tensor, persistent) in unread.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = network
        for part in owner_name.split(".") if owner_name else ():
            if not isinstance(getattr(owner, part, None), nn.Module):
                _check_free(network, owner, part, name)
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if leaf in owner._buffers:  # a rebuilt copy's module that brought it along (a.calibrated)
            continue
        _check_free(network, owner, leaf, name)
        owner.register_buffer(leaf, tensor, persistent=persistent)
    network.__dict__["_unread"] = tuple(network.__dict__.get("_unread", ())) + tuple(
        (name, persistent) for name, (_, persistent) in unread.items())


def _check_free(network: AdjoinedNetwork, owner: nn.Module, attribute: str, name: str) -> None:
    """Refuse an unread tensor whose name the adjoined network uses for something else."""
    taken = hasattr(owner, attribute) or (owner is network and (
        attribute in AdjoinedNetwork._EXTRA_ATTRIBUTES or attribute in ("_unread", "_aliases")))
    if taken:
        raise AdjoinError(f"{name}: forward never reads it, and anfast keeps such state under its "
                          f"own name, but {attribute!r} is an attribute of the adjoined network "
                          f"({type(owner).__name__}); rename it in the model, or delete it before adjoin")


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Subclasses whose forward is their base class's (timm's Linear skips nothing but
# TorchScript; BatchNormAct2d is BatchNorm2d followed by its own .drop and .act).
_EQUIVALENT_LAYERS = {"timm.layers.linear.Linear", "timm.layers.norm_act.BatchNormAct2d"}
# Traced through, their ``self.training`` would be frozen at trace time; as leaves they
# follow train() / eval() at run time, each network drawing its own mask.
_STOCHASTIC_DEPTH = {"timm.layers.drop.DropPath", "torchvision.ops.stochastic_depth.StochasticDepth"}


_NORM_ACTS = {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.GroupNormAct",
              "timm.layers.norm_act.GroupNorm1Act"}


def _norm_epilogue(module: nn.Module) -> tuple[str, ...]:
    """Children a norm layer applies after normalising (timm's BatchNormAct2d: drop, act)."""
    return ("drop", "act") if _qualified_name(type(module)) in _NORM_ACTS else ()


def _epilogue_with_parameters(module: nn.Module) -> Optional[str]:
    """The first child of ``module``'s epilogue that has parameters (a PReLU), which anfast
    cannot slice per network; None when there is none."""
    return next((child for child in _norm_epilogue(module) if any(True for _ in getattr(module, child).parameters())),
                None)


# timm's no-trace modules anfast traces into. NormFreeBlock is one only for its
# ``out.mul_(skipinit_gain)``, which fx records without a user (pytorch#68301): the adjoined
# graph keeps every node in order and compiles no node away, so the write still comes first.
_TRACED_TIMM_LEAVES = {"timm.models.nfnet.NormFreeBlock"}


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer that keeps every layer adjoin rebuilds as one call_module node.

    Subclasses of Conv2d, Linear, BatchNorm and GroupNorm (timm's BatchNormAct2d, Conv2dSame)
    stay whole so adjoin can adopt or refuse them by name, stochastic depth stays a
    module, and timm's registered no-trace modules and functions are leaves, as in
    timm's own fx feature extraction.
    """

    def __init__(self, whole: Collection[type] = ()):
        self._whole = tuple(whole)  # classes whose forward branches on self.training (_trace)
        functions, self._timm_leaves = (), ()
        if sys.modules.get("timm") is not None:  # never import timm for a model that is not timm's
            from timm.layers import get_notrace_functions, get_notrace_modules

            functions = tuple(get_notrace_functions())
            self._timm_leaves = tuple(cls for cls in get_notrace_modules()
                                      if _qualified_name(cls) not in _TRACED_TIMM_LEAVES)
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
                           + self._timm_leaves + self._whole)
                or _qualified_name(type(module)) in (*_STOCHASTIC_DEPTH, _GRN)
                or super().is_leaf_module(module, qualified_name))


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """``model``'s graph in train mode, whose dropouts called as functions read the
    network's mode at run time; refused if eval mode's graph differs otherwise.

    fx records ``self.training`` as it was while tracing: an eval() after tracing would
    switch neither ``F.dropout(x, p, training=self.training)`` nor an ``if self.training``
    branch. Tracing both modes finds both. A submodule whose forward branches (timm's
    LeViT and EfficientFormer attention, which caches its biases in eval mode) is traced
    again as one call, for every module of its class: as a module it reads its own
    ``training`` at run time, and every network runs it whole. A branch in the model's own
    forward is refused (``_mode_error``).
    """
    evaluated = copy.deepcopy(model)  # a copy traced first would name its constants anew
    name, whole = type(model).__name__, set()
    while True:  # each try traces both copies once more, so their constants keep one name
        modes = {module: module.training for module in model.modules()}
        model.train()
        try:
            tracer = _Tracer(whole)
            graph = tracer.trace(model)
        finally:
            for module, training in modes.items():
                module.training = training
        eval_graph = _Tracer(whole).trace(evaluated.eval())
        traced = torch.fx.GraphModule(tracer.root, graph, name)
        try:
            _follow_the_mode(traced, eval_graph)
            return traced
        except _ModesDiffer as differs:
            branching = _branching_module(model, differs.train_node, differs.eval_node)
            if branching is None or branching in whole:
                raise _mode_error(name, differs.train_node, differs.eval_node) from None
            whole.add(branching)


class _ModesDiffer(Exception):
    """Where the train-mode and eval-mode graphs part (None: the graph ended there)."""

    def __init__(self, train_node: Optional[torch.fx.Node], eval_node: Optional[torch.fx.Node]):
        super().__init__()
        self.train_node, self.eval_node = train_node, eval_node


def _branching_module(model: nn.Module, *nodes: Optional[torch.fx.Node]) -> Optional[type]:
    """The class of the innermost submodule whose forward made ``nodes`` (in both modes'
    graphs), from fx's module stacks; None for the model's own forward. A leaf's own call
    is its caller's: the branch that differs is there."""
    paths = []
    for node in nodes:
        if node is not None:
            path = [qualified for qualified, _ in node.meta.get("nn_module_stack", {}).values()]
            paths.append(path[:-1] if node.op == "call_module" else path)
    common = [names[0] for names in itertools.takewhile(lambda names: len(set(names)) == 1, zip(*paths))]
    return type(model.get_submodule(common[-1])) if common else None


# Dropouts called as functions: {op: (the position of its training flag, its keyword)}.
_FUNCTIONAL_DROPOUT = {
    **{op: (2, "training") for op in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                      F.feature_alpha_dropout)},
    **{op: (2, "train") for op in (torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                                   torch.feature_alpha_dropout)},
}


class _FunctionalDropout(nn.Module):
    """A dropout the model calls as a function with its ``self.training``: as a module of
    the adjoined network it reads the network's mode at run time, through deepcopy,
    pickling (which traces the generated code again) and torch.compile."""

    def __init__(self, function: Callable, flag: tuple[int, str]):
        super().__init__()
        self.function, self.flag = function, flag

    def forward(self, *args, **kwargs):
        position, keyword = self.flag
        if keyword in kwargs or len(args) <= position:
            kwargs[keyword] = self.training
        else:
            args = (*args[:position], self.training, *args[position + 1:])
        return self.function(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.function, "__name__", str(self.function))


def _node_signature(node: torch.fx.Node, position: dict) -> tuple:
    """What ``node`` computes: its op, target and arguments, other nodes by position."""
    return node.op, node.target, torch.fx.map_arg((node.args, node.kwargs), lambda n: ("node", position[n]))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a tensor constant: equal only as the same object
        return a is b


def _follow_the_mode(traced: torch.fx.GraphModule, eval_graph: torch.fx.Graph) -> None:
    """Make each dropout whose ``training`` flag is True in ``traced`` (train mode) and
    False in ``eval_graph`` read ``self.training``; raise _ModesDiffer at any other difference."""
    train_nodes, eval_nodes = list(traced.graph.nodes), list(eval_graph.nodes)
    train_position = {n: i for i, n in enumerate(train_nodes)}
    eval_position = {n: i for i, n in enumerate(eval_nodes)}
    for train_node, eval_node in zip(train_nodes, eval_nodes):
        in_train, in_eval = _node_signature(train_node, train_position), _node_signature(eval_node, eval_position)
        if _same(in_train, in_eval):
            continue
        flag = _FUNCTIONAL_DROPOUT.get(train_node.target) if train_node.op == "call_function" else None
        if flag is not None and _same(_with_flag(in_train, flag, None), _with_flag(in_eval, flag, None)) and (
                _flag(in_train, flag) is True and _flag(in_eval, flag) is False):
            name = f"{train_node.name}_following_mode"
            while hasattr(traced, name):
                name += "_"
            traced.add_submodule(name, _FunctionalDropout(train_node.target, flag))
            with traced.graph.inserting_before(train_node):
                call = traced.graph.call_module(name, train_node.args, train_node.kwargs)
            train_node.replace_all_uses_with(call)
            traced.graph.erase_node(train_node)
            train_position[call] = train_position[train_node]
            continue
        raise _ModesDiffer(train_node, eval_node)
    if len(train_nodes) != len(eval_nodes):
        longer = train_nodes if len(train_nodes) > len(eval_nodes) else eval_nodes
        extra = longer[min(len(train_nodes), len(eval_nodes))]
        raise _ModesDiffer(*((extra, None) if longer is train_nodes else (None, extra)))
    traced.recompile()


def _flag(signature: tuple, flag: tuple[int, str]) -> Any:
    """A dropout's training flag in its signature (True, F.dropout's default, if left out)."""
    _, _, (args, kwargs) = signature
    position, keyword = flag
    return kwargs[keyword] if keyword in kwargs else args[position] if len(args) > position else True


def _with_flag(signature: tuple, flag: tuple[int, str], value: Any) -> tuple:
    op, target, (args, kwargs) = signature
    position, keyword = flag
    if keyword in kwargs:
        kwargs = {**kwargs, keyword: value}
    elif len(args) > position:
        args = (*args[:position], value, *args[position + 1:])
    return op, target, (tuple(args), dict(kwargs))


def _mode_error(model_name: str, train_node: Optional[torch.fx.Node], eval_node: Optional[torch.fx.Node]) -> AdjoinError:
    found = lambda node: _describe(node) if node is not None else "nothing"
    return AdjoinError(
        f"{model_name} computes {found(train_node)} in train mode where it computes {found(eval_node)} in eval "
        "mode: its forward branches on self.training, which fx freezes at trace time, so the adjoined "
        "network's eval() would not switch it; build the model without train-only branches (torchvision's "
        "inception_v3 and googlenet: aux_logits=False)"
    )


def _check_layer_class(module: nn.Module, where: str) -> None:
    """A subclass of a layer adjoin rebuilds must compute what its base class computes."""
    cls = type(module)
    base = next(b for b in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d) if isinstance(module, b))
    if base is nn.Conv2d:
        if conv_form(module) is not None:
            return
        raise AdjoinError(
            f"{where}: {cls.__name__} subclasses Conv2d with its own forward, which anfast cannot rebuild; anfast "
            "rebuilds nn.Conv2d and timm's Conv2dSame, StdConv2d, ScaledStdConv2d and their 'Same' variants: use "
            "one of those")
    if cls is base or cls.forward is base.forward or _qualified_name(cls) in _EQUIVALENT_LAYERS:
        child = _epilogue_with_parameters(module)
        if child is not None:
            raise AdjoinError(f"{where}.{child}: {type(getattr(module, child)).__name__} has parameters, "
                              "which anfast cannot slice per network; use a parameter-free activation")
        return
    raise AdjoinError(f"{where}: {cls.__name__} subclasses {base.__name__} with its own forward, which anfast "
                      f"cannot rebuild; use plain {base.__name__} layers")


class _ShapeProp(ShapeProp):
    """torch.fx's ShapeProp that remembers the node it runs, so a failure can name it."""

    node: Optional[torch.fx.Node] = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.node = n
        return super().run_node(n)


def _node_label(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def _run_zero_batch(graph_module: torch.fx.GraphModule, input_size: Sequence[int],
                    refusal: Callable[[str, BaseException], str]) -> None:
    """Run ``graph_module`` node by node (ShapeProp: every node gets its tensor_meta) on a
    zero batch of 2 at ``input_size``, in eval mode (running statistics untouched) and
    without gradients; a failure raises AdjoinError(refusal(" at NODE", cause))."""
    parameter = next(graph_module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    propagation = _ShapeProp(graph_module)
    try:
        # ShapeProp prints the traceback of a failing node before it raises; the error
        # below chains it (--debug shows it), so the user sees one line.
        with eval_mode(graph_module), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            propagation.propagate(torch.zeros(2, *input_size, device=device, dtype=dtype))
    except Exception as error:
        cause = error.__cause__ if isinstance(error, RuntimeError) and error.__cause__ is not None else error
        where = f" at {_node_label(propagation.node)}" if propagation.node is not None else ""
        raise AdjoinError(refusal(where, cause)) from error


def _propagate_shapes(traced: torch.fx.GraphModule, model: nn.Module, input_size: Sequence[int]) -> None:
    _run_zero_batch(traced, input_size, lambda where, cause: (
        f"{type(model).__name__} fails on an input of size (2, {', '.join(map(str, input_size))}){where}: "
        f"{type(cause).__name__}: {cause}; pass input_size=(C, H, W) that the model accepts"))


def _check_students_run(network: "AdjoinedNetwork", model: nn.Module, input_size: Sequence[int]) -> None:
    """Run the adjoined network once, as _propagate_shapes ran the model. A forward that
    fixes a channel count out of anfast's sight (in a function fx keeps whole) traces and
    runs at full width, and fails only at a student's width: refused here, naming the
    node, rather than at the first call. (A number anfast sees, ``x.view(n, 128, -1)``,
    keeps its channels at full width instead.) Its convs run on torch for this one pass
    (no tuning, no compiles)."""
    convs = [module for module in network.modules() if isinstance(module, AdjoinedConv2d)]
    backends = [conv.backend for conv in convs]
    for conv in convs:
        conv.backend = "torch"
    try:
        _run_zero_batch(network, input_size, lambda where, cause: (
            f"{type(model).__name__} runs, but its students fail{where}: {type(cause).__name__}: {cause}; "
            f"the forward fixes a channel count there out of anfast's sight (in a function or module fx "
            f"keeps whole): compute it from the tensor itself (x.shape[1], or -1), or keep those channels at "
            f"full width with a dict policy"))
    finally:
        for conv, backend in zip(convs, backends):
            conv.backend = backend


def _assign_widths(analysis: _Analysis, traced, policy, alphas, round_to) -> dict:
    if not isinstance(round_to, int) or round_to < 1:
        raise AdjoinError(f"round_to={round_to!r}: give a positive int (8 suits tensor cores)")
    modules = dict(traced.named_modules())
    if isinstance(policy, Mapping):
        shrinkable = {name for name, (kind, *_) in analysis.layers.items() if kind in ("conv", "linear")}
        unknown = sorted(set(policy) - shrinkable)
        if unknown:
            raise AdjoinError(f"policy names {unknown[:5]}, which are not conv or linear layers of the model; "
                              f"known layers start {sorted(shrinkable)[:5]}")
    groups: dict[_Dim, WidthGroup] = {}
    # Group names are unique (DAN keys its choices by them): a group no layer produces is
    # named by its node, primed where that is also a layer's name.
    taken = {dim.root().producers[0] for dim in analysis.dims if dim.root().producers}
    for dim in analysis.dims:
        root = dim.root()
        if root in groups or dim is not root:
            continue
        producers = tuple(dict.fromkeys(root.producers))
        layer_alphas = [_layer_alphas(policy, p, modules[p], alphas) for p in producers]
        group_alphas = tuple(min(a[s] for a in layer_alphas) for s in range(len(alphas))) if producers else (1.0,) * len(alphas)
        name = producers[0] if producers else root.label or "input"
        while not producers and name in taken:
            name += "'"
        taken.add(name)
        if root.fixed:
            asked = [p for p in producers if isinstance(policy, Mapping)
                     and any(a != 1 for a in _as_alphas(policy.get(p, 1), alphas, p))]
            if asked:
                raise AdjoinError(f"policy asks to shrink {asked[0]}, but its channels are the {root.fixed}")
            group_alphas = (1.0,) * len(alphas)
        widths = tuple(student_width(root.size, a, round_to, root.multiple) for a in group_alphas)
        groups[root] = WidthGroup(name, root.size, widths, group_alphas, producers, root.fixed, root.multiple,
                                  tuple(dict.fromkeys(root.reduced_by)))
    return groups


def _student_map(channels: _Channels, groups: dict, s: int) -> tuple[int, Optional[torch.Tensor]]:
    """(student width, base index or None for a prefix) of a tensor's channel axis."""
    widths = [groups[p.root()].widths[s] for p in channels.parts]
    if all(w == p.size for w, p in zip(widths[:-1], channels.parts[:-1])):
        return sum(widths) * channels.features_per_channel, None
    index, offset = [], 0
    for part, width in zip(channels.parts, widths):
        index.extend(range(offset, offset + width))
        offset += part.size
    index = torch.tensor(index, dtype=torch.long)
    per = channels.features_per_channel
    if per > 1:
        index = (index[:, None] * per + torch.arange(per)).flatten()
    return len(index), index


def _build(traced, analysis: _Analysis, groups, alphas, share_affine, backend) -> AdjoinedNetwork:
    modules = dict(traced.named_modules())
    students = range(len(alphas))
    layer_widths: dict[str, LayerWidths] = {}
    for name, (kind, x, y) in analysis.layers.items():
        ins = [_student_map(x, groups, s) for s in students]
        outs = [_student_map(y, groups, s) for s in students]
        group_name = lambda ch: groups[ch.parts[0].root()].name if len(ch.parts) == 1 else "concat"
        layer_widths[name] = LayerWidths(
            kind, x.size, y.size, tuple(w for w, _ in ins), tuple(w for w, _ in outs),
            group_name(x), group_name(y), tuple(i for _, i in ins),
            tuple(groups[p.root()].name for p in x.parts) if len(x.parts) > 1 else (),
        )
        _replace_module(traced, name, modules[name], layer_widths[name], analysis, share_affine, backend)

    # Per-channel parameters a student narrows, and what is computed from them alone
    # (a view, gamma * 2): read per network.
    sliced = {node: (dim, axis) for node, (dim, axis) in analysis.vectors.items()
              if node.op == "get_attr" and any(w != dim.size for w in groups[dim.root()].widths)}
    per_network, frontier = set(), list(sliced)
    while frontier:
        for user in frontier.pop().users:
            if user in analysis.shared and user not in per_network:
                per_network.add(user)
                frontier.append(user)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, list] = {}
    networks = len(alphas) + 1
    _add_student_statistics(traced, sorted(analysis.statistics), len(alphas))

    reductions = {node: (groups[dim.root()].name, keeps) for node, (dim, keeps) in analysis.reductions.items()
                  if not groups[dim.root()].fixed}
    if reductions and hasattr(traced, _STUDENT_REDUCTIONS):
        raise AdjoinError(f"the model has an attribute {_STUDENT_REDUCTIONS!r}, where anfast keeps the first "
                          f"student's ops over its channels; rename it in the model")

    def node_copy(node: torch.fx.Node, k: int, arg: Callable) -> torch.fx.Node:
        """Network k's copy of ``node``; a student's call of a module with running
        statistics calls its copy of the module (``_add_student_statistics``), and the
        first student's op over a shrinkable group's channels is a StudentReduction."""
        if k == 1 and node in reductions:
            name = f"{_STUDENT_REDUCTIONS}.{node.name}"
            traced.add_submodule(name, StudentReduction(node.target, keeps_channels=reductions[node][1]))
            return graph.call_module(name, torch.fx.map_arg(node.args, arg), torch.fx.map_arg(node.kwargs, arg))
        copied = graph.node_copy(node, arg)
        if k and node.op == "call_module" and node.target in analysis.statistics:
            copied.target = f"{_STUDENT_STATISTICS}.{k - 1}.{node.target}"
        return copied

    # Nodes whose networks' tensors share memory: one tensor for all, a stem conv's leading
    # channels handed to the students, and views of them.
    aliased: set[torch.fx.Node] = set()
    for node in traced.graph.nodes:
        if node.op == "output":
            per_network = [torch.fx.map_arg(node.args[0], lambda n: env[n][k]) for k in range(networks)]
            graph.output(graph.call_function(_make_output, tuple(per_network)))
            continue
        if node in sliced:
            base = graph.node_copy(node)
            dim, axis = sliced[node]
            env[node] = [base] + [base if width == dim.size else graph.call_function(torch.narrow, (base, axis, 0, width))
                                  for width in groups[dim.root()].widths]
            continue
        if node in analysis.shared and node not in per_network:
            copied = graph.node_copy(node, lambda n: env[n][0])
            env[node] = [copied] * networks
            aliased.add(node)
            continue
        if node.op == "call_module" and node.target in layer_widths:
            if len(node.args) != 1 or node.kwargs:
                raise AdjoinError(f"{node.target}: called with extra arguments; anfast adjoins single-input layers")
            (x,) = node.args
            call = graph.call_module(node.target, tuple(env[x]))
            outputs = [graph.call_function(operator.getitem, (call, k)) for k in range(networks)]
            for child in _norm_epilogue(modules[node.target]):
                outputs = [graph.call_module(f"{node.target}.{child}", (y,)) for y in outputs]
            env[node] = outputs
            if layer_widths[node.target].kind == "conv" and x in analysis.shared:
                aliased.add(node)  # the students' outputs are views of the base's
            continue
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if x in aliased and _writes_in_place(node, modules):
            # Every network would write into the one tensor (nn.SiLU(inplace=True) after a
            # stem conv: the base's leading channels activated twice): each student writes
            # into its own copy, taken before the base's op writes.
            own = [env[x][0]] + [graph.call_method("clone", (env[x][k],)) for k in range(1, networks)]
            env[node] = [node_copy(node, k, lambda n: own[k] if n is x else env[n][k]) for k in range(networks)]
            continue
        env[node] = [node_copy(node, k, lambda n: env[n][k]) for k in range(networks)]
        if x in aliased and _returns_view(node, modules):
            aliased.add(node)
    network = AdjoinedNetwork(traced, graph, class_name="AdjoinedNetwork")
    network.layer_widths = layer_widths
    network.statistics_modules = tuple(sorted(analysis.statistics))
    network.channel_vectors = {node.target: (axis, groups[dim.root()].name)
                               for node, (dim, axis) in analysis.vectors.items()
                               if node.op == "get_attr" and not groups[dim.root()].fixed}
    fixed = {group.name for group in groups.values() if group.fixed}
    for name, widths in layer_widths.items():
        if widths.out_group in fixed:
            continue
        if widths.kind == "conv" and network.get_submodule(name).scale is not None:
            network.channel_vectors[f"{name}.gain"] = (0, widths.out_group)  # ScaledStdConv2d's per-filter gain
        elif widths.kind == "grn":  # timm's GlobalResponseNorm has no size argument, only these two vectors
            network.channel_vectors.update({f"{name}.{key}": (0, widths.out_group) for key in ("weight", "bias")})
    network.channel_ops = {node.name: tuple((groups[part.root()].name, flops) for part in analysis.channels[node].parts)
                           for node, flops in analysis.channel_ops.items()}
    network.channel_reductions = {f"{_STUDENT_REDUCTIONS}.{node.name}": group for node, (group, _) in reductions.items()}
    return network


# Where each student's copies of modules with running statistics live: ``student_statistics.{s}.{name}``.
_STUDENT_STATISTICS = "student_statistics"
# Where the first student's ops over a shrinkable group's channels live: ``student_reductions.{node}``.
_STUDENT_REDUCTIONS = "student_reductions"


def _add_student_statistics(traced: torch.fx.GraphModule, names: Sequence[str], students: int) -> None:
    """Give each student a copy of each module ``names`` with its own buffers (running
    statistics) and the base's parameters (the same Parameter objects), under
    ``student_statistics.{s}.{name}``: every network runs such a module whole, and each
    keeps its statistics apart, as the exported student, the model's own class, does."""
    if names and hasattr(traced, _STUDENT_STATISTICS):
        raise AdjoinError(f"the model has an attribute {_STUDENT_STATISTICS!r}, where anfast keeps the students' "
                          f"running statistics of {names[0]}; rename it in the model")
    for name in names:
        module = traced.get_submodule(name)
        shared = {id(p): p for p in module.parameters()}
        for s in range(students):
            traced.add_submodule(f"{_STUDENT_STATISTICS}.{s}.{name}", copy.deepcopy(module, dict(shared)))


def _writes_in_place(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its first argument: ``x.mul_(g)``, ``F.silu(x, inplace=True)``,
    ``nn.SiLU(inplace=True)``."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    name = _op_name(node)
    return name.endswith("_") and not name.endswith("__")


# Ops whose result shares its first argument's memory.
_VIEWS = {"view", "view_as", "reshape", "reshape_as", "narrow", "permute", "transpose", "flatten", "squeeze",
          "unsqueeze", "expand", "expand_as", "contiguous", "split", "chunk", "unbind", "movedim", "getitem",
          "detach"}


def _returns_view(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Identity)
    return _op_name(node) in _VIEWS


def _op_name(node: torch.fx.Node) -> str:
    """A method's or function's name (``mul_``, ``getitem``); "" for other nodes."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name if isinstance(name, str) else ""


def _replace_module(traced, name, module, widths: LayerWidths, analysis, share_affine, backend) -> None:
    shared = any(n.op == "call_module" and n.target == name and n.args[0] in analysis.shared
                 for n in traced.graph.nodes)
    if widths.kind == "conv":
        new = AdjoinedConv2d.from_conv(
            module, student_out_channels=widths.student_out, student_in_channels=widths.student_in,
            student_in_indices=widths.in_indices, input_shared=shared, backend=backend,
        )
    elif widths.kind == "linear":
        new = AdjoinedLinear.from_linear(
            module, student_in_features=widths.student_in, student_out_features=widths.student_out,
            student_in_indices=widths.in_indices, input_shared=shared,
        )
    elif widths.kind in ("layernorm", "groupnorm", "grn"):
        if widths.kind == "layernorm":
            new = AdjoinedLayerNorm.from_layernorm(module, widths.student_out, _layer_norm_axis(module))
        elif widths.kind == "groupnorm":
            new = AdjoinedGroupNorm.from_groupnorm(module, widths.student_out)
        else:
            new = AdjoinedGlobalResponseNorm.from_grn(module, widths.student_out)
    else:
        adjoined = AdjoinedBatchNorm1d if isinstance(module, nn.BatchNorm1d) else AdjoinedBatchNorm2d
        new = adjoined.from_batchnorm(module, widths.student_out, widths.in_indices, share_affine)
    for child in _norm_epilogue(module):  # timm's norm-act layers: parameter-free, applied to every network's output
        new.add_module(child, getattr(module, child))
    new.train(module.training)
    parent_name, _, child = name.rpartition(".")
    setattr(traced.get_submodule(parent_name), child, new)
