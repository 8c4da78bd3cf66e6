"""The DAN search space: one width choice per shrinkable width group (DESIGN.md section 3).

The search runs the student at full width (``adjoin(model, alpha=1, policy="all")``,
so it has its own batch norms) and narrows it softly with channel masks; this
module says which groups can shrink, what widths each choice gives them, and which
layer outputs carry each group's mask.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.fx

from anfast.adjoin import AdjoinedNetwork, WidthGroup, student_width
from anfast.nn import AdjoinedBatchNorm2d

__all__ = ["DanError", "SearchSpace", "DEFAULT_CHOICES"]

# The paper searched (1, 2, 4); 8 lets a group drop to an eighth when the target is tight.
DEFAULT_CHOICES = (1.0, 2.0, 4.0, 8.0)

_CHANNEL_NORMS = ("layernorm", "groupnorm", "grn")  # normalised per width choice (anfast.dan.gates), not masked


class DanError(ValueError):
    """A search setting or model DAN cannot work with; the message names the fix."""


@dataclass
class SearchSpace:
    """Shrinkable width groups, their widths per choice, and where their masks go.

    ``widths[g, i]`` is the student width of group ``groups[g]`` at ``choices[i]``,
    computed by anfast.adjoin.student_width exactly as adjoin will build it.
    ``mask_points`` maps a module name to the group whose mask multiplies that
    module's student output. ``norm_points`` maps each LayerNorm and GroupNorm over a
    searched group to that group: its student output is the gate-weighted sum of the norms
    of each choice's leading channels, each zero beyond its width (masked by itself).
    ``standardised_points`` maps each weight-standardised conv (groups=1) that reads a
    searched group to that group: its student convolves with the gate-weighted sum of the
    filters standardised over each choice's leading input channels. ``concat_points`` maps
    each batch norm over a channel concat with a searched part to its parts, (group index
    or None where the part is not searched, channels) each: its student output is masked
    by the parts' masks end to end. ``reduction_points`` maps each StudentReduction (an op
    over a searched group's channels: CBAM's channel mean and max) to that group: its
    student output is the gate-weighted sum of the op on each choice's leading channels.
    ``leading_channels`` maps a norm or standardised conv over a channel concat whose last
    part is its searched group to the channels of the whole parts before that part: each
    choice's channels are those and the group's leading ``widths[g, i]``.
    """

    groups: list[WidthGroup]
    choices: tuple[float, ...]
    round_to: int
    widths: torch.Tensor  # (groups, choices), int64
    mask_points: dict[str, int]
    norm_points: dict[str, int] = field(default_factory=dict)
    standardised_points: dict[str, int] = field(default_factory=dict)
    concat_points: dict[str, tuple[tuple[Optional[int], int], ...]] = field(default_factory=dict)
    reduction_points: dict[str, int] = field(default_factory=dict)
    leading_channels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every group's channels end to end: the group owning each, and the choices whose
        # width it lies beyond (c >= width_i), so channel_masks is three ops a step however
        # many groups there are.
        sizes = [g.channels for g in self.groups]
        self._owner = torch.repeat_interleave(torch.arange(len(sizes), device=self.widths.device),
                                              torch.tensor(sizes, device=self.widths.device))
        position = torch.cat([torch.arange(c, device=self.widths.device) for c in sizes])
        self._beyond = position[:, None] >= self.widths[self._owner]
        self._sizes = sizes

    def to(self, device: Union[str, torch.device]) -> "SearchSpace":
        """Keep the widths and the mask tables on ``device``, where the search's steps read
        them, so no step copies them there; returns self."""
        self.widths, self._owner, self._beyond = (t.to(device) for t in (self.widths, self._owner, self._beyond))
        return self

    @classmethod
    def from_network(cls, network: AdjoinedNetwork, choices: Sequence[float] = DEFAULT_CHOICES,
                     round_to: int = 8) -> "SearchSpace":
        """The space of ``network``, an adjoined network whose one student is full width."""
        choices = _check_choices(choices)
        if network.num_students != 1 or any(
                w.student_out[0] != w.out_channels for w in network.layer_widths.values()):
            raise DanError("the search network must have one full-width student: build it with "
                           "anfast.adjoin(model, alpha=1, policy='all')")
        # A group an op reduces over (x.mean(1)) is not searched: masked to zero at full
        # width, its channels would still count in the mean (or the max) the op takes.
        # A LayerNorm / GroupNorm / GRN or a standardised conv normalises each width choice of
        # one group. Over a concat it can where the last part alone can shrink: each choice's
        # channels are then the concat's leading ones, the whole parts before it and the
        # part's own leading channels (RDNet's transitions). The parts of any other concat
        # such a layer reads are not searched.
        shrinkable = {g.name for g in network.width_groups if not g.fixed and not g.reduced_by}
        channels = {g.name: g.channels for g in network.width_groups}
        reads: dict[str, tuple[str, int]] = {}  # layer -> (the group it reads, the whole channels before it)
        mixed_concat: set[str] = set()
        for name, w in network.layer_widths.items():
            reads[name] = (w.in_group, 0)
            if w.in_group == "concat" and (w.kind in _CHANNEL_NORMS or _standardises_all_inputs(network, name, w)):
                if [part for part in w.in_parts if part in shrinkable] == [w.in_parts[-1]]:
                    reads[name] = (w.in_parts[-1], sum(channels[part] for part in w.in_parts[:-1]))
                else:
                    mixed_concat.update(w.in_parts)
        groups = [g for g in network.width_groups if g.name in shrinkable and g.name not in mixed_concat]
        if not groups:
            reduced = [g for g in network.width_groups if g.reduced_by and not g.fixed]
            why = (f"the groups that could shrink are reduced over ({reduced[0].name} by {reduced[0].reduced_by[0]}), "
                   "which channel masks cannot narrow exactly" if reduced
                   else "every channel axis is the model input or output")
            raise DanError(f"{type(network.architecture()).__name__} has no width group that a search can "
                           f"shrink ({why}); nothing to search")
        names = [g.name for g in network.width_groups]
        if len(set(names)) != len(names):
            raise DanError(f"width group names repeat ({names}); DAN keys its choices by group name")
        widths = torch.tensor([[student_width(g.channels, a, round_to, g.multiple) for a in choices]
                               for g in groups], dtype=torch.long)
        index = {g.name: i for i, g in enumerate(groups)}
        searched = {name: index[group] for name, (group, _) in reads.items() if group in index}  # layers reading one
        widths_of = network.layer_widths
        norm_points = {name: group for name, group in searched.items() if widths_of[name].kind in _CHANNEL_NORMS}
        standardised = {name: group for name, group in searched.items()
                        if _standardises_all_inputs(network, name, widths_of[name])}
        leading = {name: reads[name][1] for name in searched if reads[name][1]}
        # A batch norm over a concat (DenseNet's norm1) re-normalises its masked channels:
        # masked after, by its parts' masks end to end (a part not searched: ones).
        concat_points = {name: tuple((index.get(part), channels[part]) for part in w.in_parts)
                         for name, w in network.layer_widths.items()
                         if w.kind == "norm" and w.in_group == "concat" and set(w.in_parts) & set(index)}
        reductions = {name: index[group] for name, group in network.channel_reductions.items() if group in index}
        return cls(groups, choices, round_to, widths, _mask_points(network, index, norm_points), norm_points,
                   standardised, concat_points, reductions, leading)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def channel_masks(self, gates: torch.Tensor) -> list[torch.Tensor]:
        """m_g[c] = sum_i gates[g, i] * 1[c < widths[g, i]], one (C_g,) tensor per group
        (views of one tensor of every group's channels)."""
        owner, beyond = self._owner.to(gates.device), self._beyond.to(gates.device)  # no-ops after .to(device)
        return list(gates[owner].masked_fill(beyond, 0).sum(dim=-1).split(self._sizes))

    def alphas(self, choice_index: torch.Tensor) -> dict[str, float]:
        """{group name: alpha} of one choice index per group."""
        return {g.name: self.choices[int(i)] for g, i in zip(self.groups, choice_index)}


def _check_choices(choices: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(c) for c in choices)
    if len(values) < 2 or not all(math.isfinite(c) and c >= 1 for c in values) or len(set(values)) != len(values):
        raise DanError(f"choices={tuple(choices)}: give two or more distinct width divisors >= 1, "
                       "e.g. 1,2,4,8 (the student is 1/alpha as wide)")
    return tuple(sorted(values))


def _standardises_all_inputs(network: AdjoinedNetwork, name: str, widths) -> bool:
    """Whether layer ``name`` is a weight-standardised conv whose filters span all its input
    channels (groups=1): a narrower input changes every filter's standardisation. A grouped
    one keeps its fan-in (whole groups), so a mask on its input is exact."""
    if widths.kind != "conv":
        return False
    module = network.get_submodule(name)
    return module.standardise_eps is not None and module.groups == 1


def _mask_points(network: AdjoinedNetwork, group_index: dict[str, int], norm_points: dict[str, int]) -> dict[str, int]:
    """Every student tensor of a group must carry the group's mask.

    Masking after each batch norm of a group covers the tensors that norm produces
    (a norm would otherwise re-normalise masked channels back to its bias); a
    producer whose student output reaches anything but norms is masked itself.
    ReLU, pooling and residual adds then pass the mask on unchanged. A LayerNorm,
    GroupNorm or GRN (``norm_points``) masks its own output: it normalises each choice's leading
    channels alone, so its input needs no mask either.
    """
    points: dict[str, int] = {}
    modules = dict(network.named_modules())
    for name, widths in network.layer_widths.items():
        group = group_index.get(widths.out_group)
        if group is None or name in norm_points:
            continue
        if widths.kind == "norm" or not _feeds_only_norms(network, name, modules, norm_points):
            points[name] = group
    return points


def _feeds_only_norms(network: torch.fx.GraphModule, name: str, modules: dict, norm_points: dict[str, int]) -> bool:
    """Whether layer ``name``'s student output reaches batch norms and ``norm_points``
    alone, through ops that only move axes (ConvNeXt's depthwise conv: a permute, then its
    LayerNorm)."""
    for node in network.graph.nodes:
        if node.op == "call_module" and node.target == name:
            students = [u for u in node.users if u.args[1] == 1]  # getitem(call, 1): the student
            users = [u for s in students for u in _readers(s)]
            return bool(users) and all(u.op == "call_module" and (
                isinstance(modules[u.target], AdjoinedBatchNorm2d) or u.target in norm_points) for u in users)
    raise DanError(f"{name}: not called in the network's graph")


_AXIS_MOVES = {("call_function", torch.permute), ("call_function", torch.transpose), ("call_function", torch.movedim),
               ("call_method", "permute"), ("call_method", "transpose"), ("call_method", "movedim"),
               ("call_method", "contiguous")}


def _readers(node: torch.fx.Node):
    """The nodes that read ``node``'s values, looking through ops that only move its axes."""
    for user in node.users:
        if (user.op, user.target) in _AXIS_MOVES and user.args[0] is node:
            yield from _readers(user)
        else:
            yield user
