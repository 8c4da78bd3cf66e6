"""Gumbel-softmax choice gates per width group and the soft channel masks they apply.

Per group g the search learns logits theta_g over the width choices; each step draws
gate weights g = softmax((theta_g + G) / tau) with Gumbel noise G (resampled every
step, or one draw kept for the whole search as in the paper), and the full-width
student's tensors of group g are multiplied by m_g[c] = sum_i g_i * 1[c < width_i]. A
LayerNorm, GroupNorm or GRN over group g outputs sum_i g_i * norm(x[:width_i]), each term
zero beyond its width: masked channels must not count in its statistics (nor take GRN's
bias). For the same reason a weight-standardised conv reading group g convolves with
sum_i g_i * S_i, S_i its filters standardised over the leading width_i input channels
(zero beyond), and an op that reduces or mixes group g's channels (CBAM's channel mean
and max) outputs sum_i g_i * op(x[:, :width_i]).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from anfast.adjoin import AdjoinedNetwork
from anfast.dan.space import SearchSpace
from anfast.nn import AdjoinedBatchNorm2d, AdjoinedConv2d, AdjoinedLinear

__all__ = ["ChoiceGates", "StudentMasks", "temperature", "entropy"]


def temperature(epoch: float, tau0: float = 15.0, decay: float = 0.956) -> float:
    """tau(e) = tau0 * decay^e, the paper's annealing (tau0 = 15, decay 0.956 per epoch)."""
    return tau0 * decay**epoch


class ChoiceGates(nn.Module):
    """Architecture logits ``theta`` (groups x choices) and their Gumbel-softmax gates.

    Args:
        space: the SearchSpace whose groups and choices the logits cover.
        frozen_noise: draw the Gumbel noise once and keep it (the paper's choice)
            instead of resampling it at every call.
        generator: random source of the frozen draw, for reproducible searches.
    """

    def __init__(self, space: SearchSpace, frozen_noise: bool = False,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        shape = (len(space.groups), len(space.choices))
        self.theta = nn.Parameter(torch.zeros(shape))
        self.frozen_noise = frozen_noise
        self.register_buffer("noise", _gumbel(shape, generator) if frozen_noise else None)

    def forward(self, tau: Union[float, torch.Tensor], *, learn: bool = True) -> torch.Tensor:
        """Gate weights (groups x choices), each row on the simplex, differentiable in theta
        unless ``learn`` is False. ``tau`` may be a 0-d device tensor."""
        noise = self.noise if self.frozen_noise else _gumbel(self.theta.shape, device=self.theta.device)
        return torch.softmax((self._logits(learn) + noise) / tau, dim=-1)

    def probabilities(self, *, learn: bool = True) -> torch.Tensor:
        """softmax(theta): the architecture distribution without noise (differentiable unless
        ``learn`` is False)."""
        return torch.softmax(self._logits(learn), dim=-1)

    def _logits(self, learn: bool) -> torch.Tensor:
        return self.theta if learn else self.theta.detach()

    def argmax(self) -> torch.Tensor:
        """The derived architecture: the most likely choice of each group."""
        return self.theta.detach().argmax(dim=-1)

    def extra_repr(self) -> str:
        return f"groups={self.theta.shape[0]}, choices={self.theta.shape[1]}, frozen_noise={self.frozen_noise}"


def _gumbel(shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator, device=device).clamp_(1e-10, 1.0)
    return -torch.log(-torch.log(uniform))


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy (nats) of each row of probabilities."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1).mean()


class StudentMasks:
    """Multiply the student outputs of a group's layers by its mask (a batch norm over a
    channel concat, ``space.concat_points``: by its parts' masks end to end): a batch norm
    multiplies its affine parameters by it, a linear or a conv its weight rows and bias
    (their ``student_mask``), so a mask costs products over parameters, not activations.

    ``set_gates(gates)`` before each forward; ``remove()`` gives the layers back their own
    student computation. With
    one-hot gates the masked full-width student computes exactly the derived student
    (the masked channels are zero everywhere they would not exist). A LayerNorm,
    GroupNorm or GRN over a searched group (``space.norm_points``) instead outputs the
    gate-weighted sum of each choice's norm of its leading channels, zero beyond them
    (its ``student_norm``: the norm's ``mix_leading``, one pass over x), and a
    weight-standardised conv reading one
    (``space.standardised_points``) convolves its student with the gate-weighted sum of
    each choice's standardised filters (its ``student_filters``), and an op over a
    searched group's channels (``space.reduction_points``, a StudentReduction: CBAM's
    channel mean and max) outputs the gate-weighted sum of the op on each choice's
    leading channels (its ``student_reduce``): with one-hot gates,
    what the derived student computes.
    """

    def __init__(self, network: AdjoinedNetwork, space: SearchSpace) -> None:
        self.space = space
        self._masks: Optional[list[torch.Tensor]] = None
        self._gates: Optional[torch.Tensor] = None
        masked = [(name, lambda masks, group=group: masks[group]) for name, group in space.mask_points.items()]
        masked += [(name, lambda masks, parts=parts: _end_to_end(masks, parts))
                   for name, parts in space.concat_points.items()]
        for name, _ in masked:  # refused before any layer is changed
            module = network.get_submodule(name)
            if not isinstance(module, (AdjoinedBatchNorm2d, AdjoinedLinear, AdjoinedConv2d)):  # the 1d norm too
                raise TypeError(f"StudentMasks: {name} is a {type(module).__name__}, which takes no channel "
                                f"mask; a mask goes to an adjoined batch norm, linear or conv")
        # Read once, here: the mixtures then index the gates on the device without a sync.
        widths = [[int(w) for w in row] for row in space.widths.tolist()]
        self._overridden = []
        # Over a concat whose last part is the group: each choice's channels follow the whole parts before.
        leading = lambda name, group: [space.leading_channels.get(name, 0) + w for w in widths[group]]
        for name, group in space.norm_points.items():
            module = network.get_submodule(name)
            module.student_norm = self._mixed_norm(group, leading(name, group))
            self._overridden.append((module, "student_norm"))
        for name, group in space.standardised_points.items():
            module = network.get_submodule(name)
            module.student_filters = self._mixed_filters(group, leading(name, group))
            self._overridden.append((module, "student_filters"))
        for name, group in space.reduction_points.items():
            module = network.get_submodule(name)
            module.student_reduce = self._mixed_reduction(group, widths[group])
            self._overridden.append((module, "student_reduce"))
        for name, mask_of in masked:
            module = network.get_submodule(name)
            # The mask scales a norm's affine parameters, a linear's or a conv's weight rows and bias.
            module.student_mask = self._layer_mask(mask_of)
            self._overridden.append((module, "student_mask"))

    def set_gates(self, gates: torch.Tensor) -> None:
        self._masks = self.space.channel_masks(gates)
        self._gates = gates

    def remove(self) -> None:
        """Give the layers back their own student computation."""
        for module, attribute in self._overridden:
            delattr(module, attribute)  # back to the class's None
        self._overridden = []

    def _mask(self, mask_of) -> torch.Tensor:
        if self._masks is None:
            raise RuntimeError("StudentMasks: call set_gates(gates) before running the network")
        return mask_of(self._masks)

    def _layer_mask(self, mask_of):
        def student_mask(module: nn.Module) -> torch.Tensor:
            return self._mask(mask_of)

        return student_mask

    def _gates_per_width(self, group: int, widths: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """The group's distinct widths, ascending, and each one's gate: choices of one width
        share one, their gates summed."""
        if self._gates is None:
            raise RuntimeError("StudentMasks: call set_gates(gates) before running the network")
        gates = self._gates[group]
        distinct = sorted(set(widths))
        return distinct, [sum(gates[i] for i, w in enumerate(widths) if w == width) for width in distinct]

    def _mixture(self, group: int, widths: list[int], term, axis: int, channels: Optional[int], dtype: torch.dtype):
        """sum_i g_i * term(width_i), each term zero-padded to ``channels`` along ``axis``
        (``channels`` None: terms of one shape, not padded); choices of one width share one
        term, their gates summed."""
        mixed = None
        for width, gate in zip(*self._gates_per_width(group, widths)):
            value = gate.to(dtype) * term(width)
            if channels is not None:  # F.pad lists the last axis first
                value = F.pad(value, (0, 0) * (value.dim() - 1 - axis % value.dim()) + (0, channels - width))
            mixed = value if mixed is None else mixed + value
        return mixed

    def _mixed_norm(self, group: int, widths: list[int]):
        def student_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            distinct, gates = self._gates_per_width(group, widths)  # one pass, not one norm per choice
            return module.mix_leading(x, distinct, torch.stack(gates))

        return student_norm

    def _mixed_reduction(self, group: int, widths: list[int]):
        def student_reduce(module: nn.Module, x: torch.Tensor, *args, **kwargs):
            if module.shifts:  # sum_i g_i * (x + b) * 1[c < width_i], one pass
                mask = self._mask(lambda masks: masks[group]).to(x.dtype)
                return module.apply_op(x, *args, **kwargs) * mask.view((-1,) + (1,) * (x.dim() - 2))
            terms = {width: module.apply_op(x.narrow(1, 0, width), *args, **kwargs) for width in sorted(set(widths))}
            channels = x.shape[1] if module.keeps_channels else None
            widest = terms[max(terms)]
            if not isinstance(widest, tuple):
                return self._mixture(group, widths, terms.__getitem__, 1, channels, x.dtype)
            # (values, indices), of which the model reads the values alone (adjoin checked):
            # the values mixed, the indices the widest choice's.
            return type(widest)(tuple(
                self._mixture(group, widths, lambda width, j=j: terms[width][j], 1, channels, x.dtype)
                if element.is_floating_point() else element for j, element in enumerate(widest)))

        return student_reduce

    def _mixed_filters(self, group: int, widths: list[int]):
        def student_filters(module: nn.Module) -> torch.Tensor:
            distinct, gates = self._gates_per_width(group, widths)  # one computation, not one per choice
            return module.mix_standardised(distinct, torch.stack(gates))

        return student_filters


def _end_to_end(masks: list[torch.Tensor], parts) -> torch.Tensor:
    """The mask of a channel concat: its parts' masks, (group index, channels) each, end to
    end; ones for a part not searched (group None)."""
    return torch.cat([masks[group] if group is not None else masks[0].new_ones(channels) for group, channels in parts])
