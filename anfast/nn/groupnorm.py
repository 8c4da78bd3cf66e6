"""AdjoinedGroupNorm: a GroupNorm whose leading channels serve the students, each normalising its own."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anfast.nn.layernorm import _ChannelNorm
from anfast.nn.mixing import device_constants

__all__ = ["AdjoinedGroupNorm"]


class AdjoinedGroupNorm(_ChannelNorm, nn.GroupNorm):
    """GroupNorm for the base, and for each student over its own channels in as many groups.

    The exported student is the model's own class with a narrower norm,
    ``GroupNorm(num_groups, C_student)``, as the model's constructor builds it at that
    width: each student width is a whole number of groups (adjoin rounds it so), and a
    student's group holds ``C_student / num_groups`` of its channels. A GroupNorm keeps no
    running statistics, so the students use the leading slice of the base's affine
    parameters, as convs use the leading slice of their weight.

    Call as ``norm(x_base, *x_students)``; returns ``(y_base, *y_students)``.
    """

    _widths_name = "student_channels"
    channels_axis = 1

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 student_channels: Sequence[int] = (), device=None, dtype=None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.student_channels = tuple(int(c) for c in student_channels)
        if not all(1 <= c <= num_channels and c % num_groups == 0 for c in self.student_channels):
            raise ValueError(f"AdjoinedGroupNorm: student_channels={self.student_channels} must be multiples of "
                             f"num_groups={num_groups} in [1, {num_channels}] (the base's)")

    @classmethod
    def from_groupnorm(cls, norm: nn.GroupNorm, student_channels: Sequence[int]) -> "AdjoinedGroupNorm":
        """An AdjoinedGroupNorm that shares ``norm``'s parameters (the same Parameter objects)."""
        module = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, student_channels=student_channels,
                     device="meta")
        module.weight, module.bias = norm.weight, norm.bias
        return module

    def _normalise(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def mix_leading(self, x: torch.Tensor, widths: Sequence[int], gates: torch.Tensor) -> torch.Tensor:
        """sum_k gates[k] * normalise_leading(x, widths[k]), each zero beyond its width (a DAN
        search's student_norm; widths ascending, distinct, multiples of num_groups, one
        gate each), in one pass over x instead of one norm per width choice: see
        _MixedGroupNorm."""
        widths = self._check_mix(x, widths, gates, self.num_groups, f"multiples of num_groups={self.num_groups} ")
        return _MixedGroupNorm.apply(x, gates, self.weight, self.bias, widths, self.num_groups, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, student_channels={self.student_channels}"


class _MixedGroupNorm(torch.autograd.Function):
    """y = sum_k g_k * GN_k(x), GN_k the group norm of x's leading widths[k] channels in
    ``groups`` groups (widths[k] / groups channels each) with the leading slice of weight
    and bias, zero beyond them; x is (N, C, ...).

    As _MixedLayerNorm (anfast.nn.mixing), over blocks of ``unit`` = gcd(C, each
    choice's channels per group) channels: every group of every choice is a run of whole
    blocks. The blocks' means and variances give each choice's groups' mean and rstd,
    per sample. In block b the mixture is affine in x, per sample:
    y = (x * A_b - B_b) * weight + H_b * bias with
    A_b = sum_k g_k rstd_{k, group_k(b)} over the choices k that have block b,
    B_b = sum_k g_k rstd mean of the same, H_b = sum_k g_k; and so is its gradient.
    Computing x * A_b - B_b rather than (x - mean) * rstd loses about |mean| / std units
    in the last place: nothing in float64, and in float32 little unless a group's values
    are nearly equal (a group of one channel at one position: its output is the bias).
    """

    @staticmethod
    def forward(ctx, x, gates, weight, bias, widths, groups, eps):
        compute = torch.promote_types(x.dtype, torch.float32)
        plan = _group_plan(widths, groups, x.shape[1], x.device, compute)
        samples = x.shape[0]
        # Each channel's mean and variance over the positions, one pass over x as it is laid
        # out (Welford: a group norm with a group per channel would give these too, but on a
        # CPU from E[x^2] - mean^2 for channels_last input, relative error 1e-4 in float32 at
        # a mean 30 standard deviations from zero); then each block's, from its channels'.
        position_axes = tuple(range(2, max(x.dim(), 3)))
        channel_var, channel_mean = torch.var_mean(_with_positions(x).to(compute), dim=position_axes, correction=0)
        channel_mean = channel_mean.view(samples, -1, plan.unit)
        block_mean = channel_mean.mean(-1)
        block_var = channel_var.view(samples, -1, plan.unit).mean(-1) + (
            channel_mean - block_mean.unsqueeze(-1)).square().mean(-1)
        # A choice's group: the mean of its blocks' variances plus the variance of their means
        # (all one size), every choice at once, (samples, K * groups).
        block_mean = block_mean.repeat(1, len(widths))  # (samples, K * blocks): choice k's copy at k
        mean = _over_groups(block_mean, plan, average=True)
        offset = block_mean - mean.index_select(1, plan.group_of_block)
        var = _over_groups(block_var.repeat(1, len(widths)) + offset.square(), plan, average=True)
        mean, rstd = mean.view(samples, -1, groups), torch.rsqrt(var + eps).view(samples, -1, groups)
        gates = gates.to(compute)
        # Per channel, (samples, C, 1, ...): the full-size ops then run on x as it is laid
        # out and give a new tensor, not a view of one, which a ReLU after may modify in place.
        # The weight and the gates' share of the bias go into them: one op over x gives y.
        scale, lower = _to_channels(torch.stack([rstd, -rstd * mean], 1), gates, plan, x.dim()).unbind(1)
        if weight is not None:
            weight_channels = _per_channel(weight, x.dim())
            lower = lower * weight_channels if bias is None else torch.addcmul(
                _per_channel(_gate_sums(gates, plan) * bias, x.dim()), lower, weight_channels)
            scale = scale * weight_channels
        normalised = torch.addcmul(lower, x, scale)
        ctx.save_for_backward(x, gates, weight, bias, mean, rstd)
        ctx.widths, ctx.groups = widths, groups
        return normalised.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        """As _MixedLayerNorm's, per sample and group: with gw = dy * weight, P and Q the
        sums of gw and gw * x over a choice's group, R = rstd * (Q - mean * P) and M the
        group's elements, dx = gw * A_b + x * alpha_b + beta_b, alpha_b and beta_b the
        gates' sums over the choices that have block b of -rstd^2 R / M and
        rstd (mean rstd R - P) / M of its group. Everything comes from dy's and dy * x's sums
        over each sample's channel's positions: P and Q (times the weight), the bias's and
        the gates' gradients, and the weight's, sum_n A_nc * sum(dy x) - B_nc * sum(dy)."""
        x, gates, weight, bias, mean, rstd = ctx.saved_tensors
        widths, groups = ctx.widths, ctx.groups
        compute = gates.dtype
        plan = _group_plan(widths, groups, x.shape[1], x.device, compute)
        samples, positions = x.shape[0], x[0, 0].numel()
        x_compute, grad = x.to(compute), grad.to(compute)
        over_positions = tuple(range(2, max(x.dim(), 3)))
        sum_grad = _with_positions(grad).sum(over_positions)  # (samples, C)
        sum_grad_x = _with_positions(grad * x_compute).sum(over_positions)
        weighted = torch.stack([sum_grad, sum_grad_x], 1)  # (samples, 2, C)
        if weight is not None:
            weighted = weighted * weight
        # (samples, 2, K * blocks)
        per_block = weighted.view(samples, 2, -1, plan.unit).sum(-1).repeat(1, 1, len(widths))
        # (samples, K, groups) each
        P, Q = _over_groups(per_block, plan, average=False).unflatten(-1, (-1, groups)).unbind(1)
        R = rstd * (Q - mean * P)
        per_element = rstd / plan.group_elements.view(1, -1, 1) / positions
        scale, lower, alpha, beta = _to_channels(torch.stack([
            rstd, -rstd * mean, -per_element * rstd * R, per_element * (mean * rstd * R - P)], 1),
            gates, plan, x.dim()).unbind(1)
        grad_x = grad_gates = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_scale = scale if weight is None else scale * _per_channel(weight, x.dim())
            grad_x = torch.addcmul(torch.addcmul(beta, x_compute, alpha), grad, grad_scale).to(x.dtype)
        column_sums = None  # dy summed over samples and positions, (C,)
        if bias is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
            column_sums = sum_grad.sum(0)
        if ctx.needs_input_grad[1]:
            grad_gates = R.sum((0, 2))
            if bias is not None:  # each choice adds its bias over its own channels
                grad_gates = grad_gates + torch.cumsum(column_sums * bias, 0)[plan.last_channels]
        if ctx.needs_input_grad[2] and weight is not None:  # dy times the normalised x, summed
            grad_weight = (scale.reshape(samples, -1) * sum_grad_x + lower.reshape(samples, -1) * sum_grad).sum(0) \
                .to(weight.dtype)
        if ctx.needs_input_grad[3] and bias is not None:
            grad_bias = (_gate_sums(gates, plan) * column_sums).to(bias.dtype)
        return grad_x, grad_gates, grad_weight, grad_bias, None, None, None


class _GroupPlan(NamedTuple):
    """How _MixedGroupNorm's widths and groups split the channels, as tensors on one device."""

    unit: int                     # channels per block: gcd of the channels and each choice's per group
    groups: int                   # each choice's groups
    group_elements: torch.Tensor  # (K,) channels in each choice's group (times the positions: M)
    group_of_block: torch.Tensor  # (K * blocks,) for choice k and block b: k * groups + b's group in k
    membership: torch.Tensor      # (K, blocks) 1 where choice k has block b
    block_share: torch.Tensor     # (K * blocks,) membership / the blocks in the block's group in k
    last_channels: torch.Tensor   # (K,) index of each choice's last channel


def _group_plan(widths: tuple[int, ...], groups: int, channels: int, device, dtype) -> _GroupPlan:
    return device_constants(_make_group_plan, widths, groups, channels, device, dtype)


def _make_group_plan(widths, groups, channels, device, dtype) -> _GroupPlan:
    per_group = [w // groups for w in widths]
    unit = math.gcd(channels, *per_group)
    blocks = channels // unit
    blocks_per_group = tuple(n // unit for n in per_group)
    group_of_block = [k * groups + min(b // n, groups - 1)
                      for k, n in enumerate(blocks_per_group) for b in range(blocks)]
    membership = [[float(b < groups * n) for b in range(blocks)] for n in blocks_per_group]
    share = [m / n for row, n in zip(membership, blocks_per_group) for m in row]
    tensor = functools.partial(torch.tensor, device=device)
    return _GroupPlan(unit, groups, tensor(per_group, dtype=dtype), tensor(group_of_block),
                      tensor(membership, dtype=dtype), tensor(share, dtype=dtype), tensor([w - 1 for w in widths]))


def _over_groups(per_block: torch.Tensor, plan: _GroupPlan, average: bool) -> torch.Tensor:
    """(..., K * blocks) -> (..., K * groups): each choice's groups' sum (or mean) of its
    member blocks' values (a block no choice has adds nothing)."""
    weights = plan.block_share if average else plan.membership.flatten()
    bins = per_block.new_zeros(per_block.shape[:-1] + (plan.membership.shape[0] * plan.groups,))
    return bins.index_add(-1, plan.group_of_block, per_block * weights)


def _with_positions(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) as it is, an (N, C) tensor as (N, C, 1): reductions over the positions,
    axes 2 on, then have an axis to reduce (an empty tuple of axes would reduce them all)."""
    return t if t.dim() > 2 else t.unsqueeze(-1)


def _per_channel(values: torch.Tensor, dims: int) -> torch.Tensor:
    """(..., C) -> (..., C, 1, ...): broadcast over the positions of a ``dims``-d (N, C, ...) tensor."""
    return values.view(values.shape + (1,) * (dims - 2))


def _to_channels(per_group: torch.Tensor, gates: torch.Tensor, plan: _GroupPlan, dims: int) -> torch.Tensor:
    """(samples, Q, K, groups) -> (samples, Q, C, 1, ...): for each channel, the gates' sum
    over the choices that have its block of the value of its group in that choice."""
    samples, quantities, choices, _ = per_group.shape
    of_blocks = per_group.flatten(2).index_select(2, plan.group_of_block).view(samples, quantities, choices, -1)
    per_block = (of_blocks * (gates[:, None] * plan.membership)).sum(2)
    return _per_channel(per_block.repeat_interleave(plan.unit, -1), dims)


def _gate_sums(gates: torch.Tensor, plan: _GroupPlan) -> torch.Tensor:
    """(C,): the gates' sum over the choices that have each channel's block."""
    return (gates[:, None] * plan.membership).sum(0).repeat_interleave(plan.unit)
