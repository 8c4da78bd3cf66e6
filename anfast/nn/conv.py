"""AdjoinedConv2d: one nn.Conv2d whose leading filters also serve the students."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anfast.nn.mixing import check_mix_widths, device_constants, mixed_layer_norm
from anfast.nn.streams import active_streams, hand_over, network_stream
from anfast.ops import adjoined_conv2d
from anfast.ops.backend import BACKEND_PRIORITY
from anfast.ops.conv import fixed_backend_name
from anfast.ops.reference import student_groups, student_weight

__all__ = ["AdjoinedConv2d", "autocast_inputs", "check_student_inputs", "check_student_widths", "conv_form",
           "numeric_padding", "pad_same", "standardised_weight", "student_scale", "unknown_backend"]


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv.padding`` as (pad_h, pad_w): "valid" is 0; "same" is dilation * (k - 1) / 2 per
    side, which must be whole (nn.Conv2d pads an even kernel's "same" unevenly, which the
    adjoined op's symmetric padding cannot express). Raises ValueError otherwise."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {tuple(conv.kernel_size)} and dilation "
                         f"{tuple(conv.dilation)} pads unevenly; give explicit padding or an odd kernel")
    return tuple(t // 2 for t in total)


def pad_same(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int]) -> torch.Tensor:
    """``x`` padded as TensorFlow's "SAME" convolution pads it at its size (timm's Conv2dSame
    at run time): ceil(size / stride) outputs per axis, an odd pixel of padding going last."""
    pads = []
    for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(kernel_size), reversed(stride), reversed(dilation)):
        total = max(((size + s - 1) // s - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]  # F.pad's order: the last axis first
    return F.pad(x, pads)


def standardised_weight(weight: torch.Tensor, eps: float, gain: Optional[torch.Tensor] = None,
                        scale: float = 1.0) -> torch.Tensor:
    """Weight standardisation as timm's StdConv2d (no ``gain``) and ScaledStdConv2d (BiT,
    NFNets) compute it: each filter to zero mean and unit variance over its input channels
    and taps (``eps`` added to the variance), then times ``gain * scale`` (gain: (C_out, 1, 1, 1))."""
    affine = None if gain is None else (gain * scale).view(-1)
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=affine, training=True,
                        momentum=0.0, eps=eps).reshape_as(weight)


def student_scale(scale: float, fan_in: int, student_fan_in: int) -> float:
    """ScaledStdConv2d's ``scale``, gamma / sqrt(fan-in), for a slice of ``student_fan_in``
    inputs per filter: what timm's layer of the student's width computes (the base's own
    value where the fan-in is the base's)."""
    return scale if student_fan_in == fan_in else scale * math.sqrt(fan_in / student_fan_in)


# timm's Conv2d subclasses with a forward of their own, and what they compute beyond
# nn.Conv2d, as AdjoinedConv2d's keyword arguments (read from the layer by ``conv_form``).
_CONV_FORMS = {
    "timm.layers.conv2d_same.Conv2dSame": lambda conv: {"pad_same": True},
    "timm.layers.std_conv.StdConv2d": lambda conv: {"standardise_eps": conv.eps},
    "timm.layers.std_conv.StdConv2dSame": lambda conv: {"standardise_eps": conv.eps, "pad_same": conv.same_pad},
    "timm.layers.std_conv.ScaledStdConv2d": lambda conv: {"standardise_eps": conv.eps, "scale": conv.scale},
    "timm.layers.std_conv.ScaledStdConv2dSame": lambda conv: {"standardise_eps": conv.eps, "scale": conv.scale,
                                                              "pad_same": conv.same_pad},
}


def _fan_in_scales(scale: float, fan_in: int, fan_ins: tuple[int, ...], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """``student_scale`` of each fan-in, as a tensor (for AdjoinedConv2d.mix_standardised)."""
    return torch.tensor([student_scale(scale, fan_in, f) for f in fan_ins], device=device, dtype=dtype)


def conv_form(conv: nn.Conv2d) -> Optional[dict[str, Any]]:
    """What ``conv`` computes beyond nn.Conv2d, as AdjoinedConv2d's keyword arguments: {} for
    nn.Conv2d and subclasses that keep its forward, None for a forward anfast does not know."""
    cls = type(conv)
    if cls.forward is nn.Conv2d.forward:
        return {}
    form = _CONV_FORMS.get(f"{cls.__module__}.{cls.__qualname__}")
    return None if form is None else form(conv)


def unknown_backend(name: Optional[str]) -> str:
    """Why ``name`` is no backend of anfast.ops.adjoined_conv2d ("" for a backend, "auto"
    and None): one check for the layer's setter and adjoin's ``backend=``."""
    if name is None or name == "auto" or name in BACKEND_PRIORITY:
        return ""
    return f"backend={name!r} is no backend; choose one of {', '.join(BACKEND_PRIORITY)}"


def check_student_widths(layer: nn.Module, inputs: tuple[str, Sequence[int], int],
                         outputs: tuple[str, Sequence[int], int]) -> None:
    """Refuse, when a layer is built, students' input and output widths, each given as (name,
    widths, the base's width), that do not pair up one to one or do not fit in the base's."""
    name = type(layer).__name__
    (in_name, in_widths, _), (out_name, out_widths, _) = inputs, outputs
    if len(in_widths) != len(out_widths):
        raise ValueError(f"{name}: {len(in_widths)} {in_name} for {len(out_widths)} {out_name}; give one "
                         f"of each per student")
    for widths_name, widths, limit in (inputs, outputs):
        if not all(1 <= c <= limit for c in widths):
            raise ValueError(f"{name}: {widths_name}={tuple(widths)} must be in [1, {limit}] (the base's)")


def check_student_inputs(layer: nn.Module, x_students: Sequence[torch.Tensor], widths_name: str,
                         widths: Sequence[int], axis: int) -> None:
    """Refuse a call that does not give one input per student, each ``widths[s]`` wide on
    ``axis``: zip would drop a missing or extra input silently, and a wrong width would run on
    another weight slice. The call check of every adjoined layer (``widths_name`` names its
    widths in the message)."""
    name = type(layer).__name__
    if len(x_students) != len(widths):
        raise ValueError(f"{name}: {len(x_students)} student inputs for {len(widths)} students; pass "
                         f"x_base and one input per student")
    unit = "features" if axis == -1 else "channels"
    for s, (x, width) in enumerate(zip(x_students, widths)):
        if x.dim() == 0 or x.dim() <= axis or x.shape[axis] != width:
            raise ValueError(f"{name}: student {s}'s input has shape {tuple(x.shape)}, expected {width} "
                             f"{unit} ({widths_name}={tuple(widths)})")


def autocast_inputs(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Cast floating tensors but float64 ones to the autocast dtype, as autocast does for F.conv2d.

    Custom ops are not on autocast's list, so the module applies its policy itself. Autocast
    leaves float64 alone (``is_eligible`` in ATen/autocast_mode.h): nn.Conv2d stays float64
    under autocast, and so does this layer.
    """
    reference = next(t for t in tensors if t is not None)
    device_type = reference.device.type
    # Autocast knows no meta device: shape-only runs (FLOP counts, census) pass through.
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


class AdjoinedConv2d(nn.Conv2d):
    """A Conv2d computing the base and every student from one shared weight.

    Student ``s`` uses ``weight[:student_out_channels[s], :student_in_channels[s]]``
    (or, after a channel concat, the input columns named by its index), the leading
    filters of the base (DESIGN.md section 1). Parameters keep nn.Conv2d's names, so
    a torchvision state_dict loads into the base.

    Call as ``conv(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    Nested students run as successive fused passes: student s is the "base" of the
    pass that computes student s + 1.

    timm's layers that compute more (``conv_form``) keep it: ``pad_same`` pads every
    input at run time as TF's "SAME" does (Conv2dSame); ``standardise_eps`` standardises
    each network's filters over its own slice (StdConv2d), times the leading rows of a
    ``gain`` parameter and a ``scale`` for the network's fan-in (ScaledStdConv2d:
    ``student_scale``). A standardised student's filters are not a slice of the base's
    standardised filters, so such a layer runs each network's conv alone.
    """

    # Class defaults: layers pickled before these existed compute plain convolutions.
    pad_same: bool = False
    standardise_eps: Optional[float] = None
    scale: Optional[float] = None
    # Set by a DAN search on a standardised layer (anfast.dan.gates.StudentMasks): the first
    # student's filters, student_filters(self) at each forward (the gates' mix of standardised
    # filters). Called with the layer, so a copy of the network computes with its own.
    student_filters: Optional[Callable[[nn.Module], torch.Tensor]] = None
    # Set by a DAN search on a conv whose student output carries a channel mask: the mask
    # of the first student's output channels, student_mask(self) at each forward,
    # multiplied into its filters and bias: conv(x, w * m, b * m) = conv(x, w, b) * m, a
    # product over the weight instead of the activation.
    student_mask: Optional[Callable[[nn.Module], torch.Tensor]] = None

    def __init__(
        self,
        *args,
        student_out_channels: Sequence[int] = (),
        student_in_channels: Sequence[int] = (),
        student_in_indices: Sequence[Optional[torch.Tensor]] = (),
        input_shared: bool = False,
        backend: Optional[str] = None,
        pad_same: bool = False,
        standardise_eps: Optional[float] = None,
        scale: Optional[float] = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if scale is not None and standardise_eps is None:
            raise ValueError("AdjoinedConv2d: scale multiplies standardised filters; give standardise_eps too")
        self.pad_same = bool(pad_same)
        self.standardise_eps = standardise_eps
        self.scale = scale
        if scale is not None:  # ScaledStdConv2d's per-filter gain, its names and shape
            self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1, device=self.weight.device,
                                                dtype=self.weight.dtype))
        self.student_out_channels = tuple(int(c) for c in student_out_channels)
        self.student_in_channels = tuple(int(c) for c in student_in_channels)
        check_student_widths(self, ("student_in_channels", self.student_in_channels, self.in_channels),
                             ("student_out_channels", self.student_out_channels, self.out_channels))
        # Students that see the base's very input (the image) get the base's leading
        # output channels, computed once (DESIGN.md section 1, "Stem").
        self.input_shared = input_shared
        if not input_shared:
            self._check_fused_form()
        self.backend = backend
        indices = tuple(student_in_indices) or (None,) * len(self.student_out_channels)
        for s, index in enumerate(indices):  # absolute: base channel of each input channel
            self.register_buffer(f"_student_index_{s}", index, persistent=False)
        # Networks run in fused pairs (base, s0), (s1, s2), ...: each pass reads the
        # wider network's weight tile once for both. A lone last student runs alone.
        self._pairs = [(n, n + 1) for n in range(0, len(self.student_out_channels) + 1, 2)]
        for parent, child in self._pairs:
            if child <= len(indices):
                relative = self._relative_index(indices, parent, child)
                self.register_buffer(f"_pair_index_{parent}", relative, persistent=False)

    @property
    def backend(self) -> Optional[str]:
        """The backend of anfast.ops.adjoined_conv2d this layer runs (None: $ANFAST_BACKEND,
        else auto); a name that is no backend is refused when set, not at the first call."""
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        unknown = unknown_backend(name)
        if unknown:
            raise ValueError(f"AdjoinedConv2d: {unknown}, or None / 'auto' for auto")
        self._backend = None if name == "auto" else name

    def _check_fused_form(self) -> None:
        """What the fused op cannot compute as nn.Conv2d would, refused before any call:
        it pads with zeros, symmetrically, and a grouped student keeps whole leading groups."""
        if self.padding_mode != "zeros":
            raise ValueError(f"AdjoinedConv2d: padding_mode={self.padding_mode!r}: the adjoined op pads "
                             f"with zeros; use padding_mode='zeros', or input_shared=True where every "
                             f"network reads the same input (the layer then runs nn.Conv2d once). "
                             f"anfast.adjoin refuses any padding mode but 'zeros', on the stem too")
        if isinstance(self.padding, str):
            self.padding = numeric_padding(self)  # "same" with an even kernel: ValueError
        if self.groups == 1:
            return
        out_per_group = self.out_channels // self.groups
        in_per_group = self.in_channels // self.groups
        for s, (c_in, c_out) in enumerate(zip(self.student_in_channels, self.student_out_channels)):
            if c_out % out_per_group or c_in != c_out // out_per_group * in_per_group:
                raise ValueError(
                    f"AdjoinedConv2d: student {s} has {c_in} input and {c_out} output channels; with "
                    f"groups={self.groups} a student keeps whole leading groups of {in_per_group} input "
                    f"and {out_per_group} output channels (e.g. {in_per_group * max(1, c_out // out_per_group)} "
                    f"and {out_per_group * max(1, c_out // out_per_group)})")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **student_kwargs) -> "AdjoinedConv2d":
        """An AdjoinedConv2d that shares ``conv``'s parameters (the same Parameter objects) and
        computes what it computes (``conv_form``: timm's same-padded and standardised convs)."""
        form = conv_form(conv)
        if form is None:
            raise ValueError(f"AdjoinedConv2d.from_conv: {type(conv).__name__} has a forward of its own, which "
                             f"AdjoinedConv2d does not know; give an nn.Conv2d")
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, numeric_padding(conv),
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device="meta", **form, **student_kwargs,
        )
        module.weight = conv.weight
        module.bias = conv.bias
        if module.scale is not None:
            module.gain = conv.gain
        return module

    @staticmethod
    def _relative_index(indices, parent: int, child: int) -> Optional[torch.Tensor]:
        """The child's input channels as positions within the parent's input channels."""
        child_index = indices[child - 1]
        if child_index is None:
            return None
        if parent == 0 or indices[parent - 1] is None:
            return child_index.long()
        position = {int(c): i for i, c in enumerate(indices[parent - 1].tolist())}
        return torch.tensor([position[int(c)] for c in child_index.tolist()], dtype=torch.long)

    def network_weight(self, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """(weight, bias, groups) of network n: 0 is the base, s + 1 is student s."""
        if n == 0:
            return self.weight, self.bias, self.groups
        out_channels = self.student_out_channels[n - 1]
        weight = student_weight(self.weight, self.student_in_channels[n - 1], out_channels,
                                self.groups, getattr(self, f"_student_index_{n - 1}"))
        bias = None if self.bias is None else self.bias[:out_channels]
        return weight, bias, student_groups(self.weight, self.groups, out_channels)

    def conv_weight(self, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """(weight, bias, groups) network n convolves with: ``network_weight``'s, standardised
        over its own slice where the layer standardises its filters (the first student's:
        ``student_filters``' where a search set them), times ``student_mask``'s channel
        mask along the first student's filters and bias where a search set one."""
        weight, bias, groups = self.network_weight(n)
        if n == 1 and self.student_filters is not None:
            weight = self.student_filters(self)
        elif self.standardise_eps is not None:
            weight = self._standardised(weight)
        if n == 1 and self.student_mask is not None:
            mask = self.student_mask(self).to(weight.dtype)
            weight = weight * mask.view(-1, 1, 1, 1)
            bias = None if bias is None else bias * mask
        return weight, bias, groups

    def standardised_filters(self, in_channels: int) -> torch.Tensor:
        """Every filter over its leading ``in_channels`` input channels, standardised as the
        layer of that input width computes them (ScaledStdConv2d's scale for its fan-in): what
        a DAN search mixes over the width choices of the group this layer reads."""
        if self.standardise_eps is None or self.groups != 1:
            raise ValueError(f"AdjoinedConv2d: standardised_filters needs a weight-standardised conv with "
                             f"groups=1 (this one: standardise_eps={self.standardise_eps}, groups={self.groups})")
        return self._standardised(self.weight[:, :in_channels])

    def mix_standardised(self, widths: Sequence[int], gates: torch.Tensor) -> torch.Tensor:
        """sum_k gates[k] * standardised_filters(widths[k]), each zero beyond its width (a
        DAN search's student_filters; widths ascending and distinct, one gate each), in one
        pass over the weight instead of one standardisation, padding and sum per choice:
        standardising a filter is a layer norm of its fan-in, input channels outermost, so
        this is anfast.nn.mixing's layer norm mix over widths[k] * taps of each filter, the
        gates times each width's ``student_scale``, then times the gain."""
        if self.standardise_eps is None or self.groups != 1:
            raise ValueError(f"AdjoinedConv2d: mix_standardised needs a weight-standardised conv with groups=1 "
                             f"(this one: standardise_eps={self.standardise_eps}, groups={self.groups})")
        widths = check_mix_widths("AdjoinedConv2d.mix_standardised", widths, self.in_channels, gates)
        weight = self.weight.flatten(1)  # (C_out, fan-in), input channels outermost
        taps = weight.shape[1] // self.in_channels
        fan_ins = tuple(w * taps for w in widths)
        if self.scale is not None:  # the mix is linear in the gates: each width's scale goes into its gate
            gates = gates * device_constants(_fan_in_scales, self.scale, weight.shape[1], fan_ins, gates.device,
                                             gates.dtype)
        mixed = mixed_layer_norm(weight, gates, None, None, fan_ins, self.standardise_eps)
        if self.scale is not None:
            mixed = mixed * self.gain.view(-1, 1)
        return mixed.view_as(self.weight)

    def _standardised(self, weight: torch.Tensor) -> torch.Tensor:
        gain, scale = None, 1.0
        if self.scale is not None:
            gain = self.gain[:weight.shape[0]]
            scale = student_scale(self.scale, self.weight[0].numel(), weight[0].numel())
        return standardised_weight(weight, self.standardise_eps, gain, scale)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """x padded as TF's "SAME" does where the layer pads so (``pad_same``), else x: what
        F.conv2d at ``self.padding`` reads."""
        return pad_same(x, self.kernel_size, self.stride, self.dilation) if self.pad_same else x

    def forward(self, x_base: torch.Tensor, *x_students: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_shared:
            weight, bias, _ = self.conv_weight(0)
            x_base = self.pad_input(x_base)
            y_base = self._conv_forward(x_base, weight, bias)  # nn.Conv2d's, any padding_mode
            y_students = [hand_over(y_base[:, :c], s + 1) for s, c in enumerate(self.student_out_channels)]
            if self.student_mask is not None:
                # A masked student convolves by itself: its mask's gradient would read the
                # base's output, which the base's in-place ReLU overwrites (VGG).
                with network_stream(1):
                    y_students[0] = self._conv_forward(x_base, *self.conv_weight(1)[:2])
            return (y_base, *y_students)
        check_student_inputs(self, x_students, "student_in_channels", self.student_in_channels, axis=1)
        inputs = tuple(self.pad_input(x) for x in (x_base, *x_students))
        if self.standardise_eps is not None or self.student_mask is not None or (
                active_streams() is not None and fixed_backend_name(self.backend, x_base.device) == "torch"):
            # Each network alone: a standardised or masked student's filters are not the
            # leading slice of the base's; on streams, the torch backend's convolutions each
            # on its own.
            return tuple(self._conv_on_stream(n, x) for n, x in enumerate(inputs))
        outputs = []
        for parent, child in self._pairs:
            if child == len(inputs):
                outputs.append(self._conv_on_stream(parent, inputs[parent]))
                continue
            x_child = hand_over(inputs[child], parent, source=child)
            # One fused launch for both, on the wider's stream; the weight slice and the
            # autocast copies too: they read that network's tensors and feed its launch.
            with network_stream(parent):
                weight, bias, groups = self.network_weight(parent)
                x_parent, x_child, weight, bias = autocast_inputs(inputs[parent], x_child, weight, bias)
                y_parent, y_child = adjoined_conv2d(
                    x_parent, x_child, weight, bias, out_student=self.student_out_channels[child - 1],
                    stride=self.stride, padding=self.padding, dilation=self.dilation, groups=groups,
                    student_in_index=getattr(self, f"_pair_index_{parent}"), backend=self.backend,
                )
            outputs += [y_parent, hand_over(y_child, child, source=parent)]
        return tuple(outputs)

    def _conv_on_stream(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """Network n's convolution alone (F.conv2d on its weight slice), on its stream."""
        with network_stream(n):  # the weight slice too: it feeds this stream's conv
            weight, bias, groups = self.conv_weight(n)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, student_in_channels={self.student_in_channels}, "
            f"student_out_channels={self.student_out_channels}"
            + (", input_shared=True" if self.input_shared else "")
            + (", pad_same=True" if self.pad_same else "")
            + (f", standardise_eps={self.standardise_eps}" if self.standardise_eps is not None else "")
            + (f", scale={self.scale}" if self.scale is not None else "")
        )
