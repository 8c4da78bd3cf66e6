"""One-pass mixes over leading widths, for a DAN search: sum_k g_k * N_k(x), N_k a norm of
x's leading widths[k] channels (zero beyond), computed in a few passes over x whatever
the number of choices, instead of one norm per choice.

``mixed_layer_norm`` serves AdjoinedLayerNorm.mix_leading and, over each filter's fan-in,
AdjoinedConv2d.mix_standardised (weight standardisation is a layer norm of each filter);
``device_constants`` keeps the mixes' host-built tables on the device (AdjoinedGroupNorm's too).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["check_mix_widths", "device_constants", "leading_sums", "mixed_layer_norm"]


def mixed_layer_norm(x: torch.Tensor, gates: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], widths: Sequence[int], eps: float,
                     channels_axis: int = -1) -> torch.Tensor:
    """sum_k gates[k] * F.layer_norm(x's leading widths[k] channels along ``channels_axis``,
    the leading slice of weight and bias), each zero beyond its width; widths ascending and
    distinct (the caller checks them). Linear in the gates, which need not sum to one.
    See _MixedLayerNorm."""
    return _MixedLayerNorm.apply(x, gates, weight, bias, tuple(widths), eps, channels_axis)


def check_mix_widths(where: str, widths: Sequence[int], channels: int, gates: torch.Tensor, multiple: int = 1,
                     what: str = "") -> tuple[int, ...]:
    """``widths`` as ints, after checking them for a mix over ``channels``: ascending,
    distinct, in [1, channels], multiples of ``multiple`` (``what`` says so in the message),
    one gate each; else a ValueError naming ``where``."""
    widths = tuple(int(w) for w in widths)
    if list(widths) != sorted(set(widths)) or not widths or widths[0] < 1 or widths[-1] > channels \
            or any(w % multiple for w in widths) or gates.shape != (len(widths),):
        raise ValueError(f"{where}: widths={list(widths)} must ascend, distinct, {what}in [1, {channels}], one "
                         f"gate each (gates of shape {tuple(gates.shape)})")
    return widths


def leading_sums(per_choice: torch.Tensor, widths: Sequence[int], channels: int) -> torch.Tensor:
    """(..., K) -> (..., channels): for each channel c, ``per_choice`` summed over the
    choices k that have it (c < widths[k], widths ascending and distinct); zero beyond the
    widest."""
    plan = _block_plan(tuple(widths), channels, per_choice.device, per_choice.dtype)
    return _per_block(per_choice, plan).repeat_interleave(plan.unit, -1)


def device_constants(make: Callable, *args):
    """``make(*args)``, tensors built from host values, made once per arguments: such a
    tensor is a synchronising copy on a GPU, which a search step must not make (traced,
    they are the graph's constants, made in the trace)."""
    if torch.compiler.is_compiling():
        return make(*args)
    return _cached_constants(make, *args)


_cached_constants = functools.lru_cache(maxsize=1024)(lambda make, *args: make(*args))


class _MixedLayerNorm(torch.autograd.Function):
    """y = sum_k g_k * LN_k(x), LN_k the layer norm of x's leading widths[k] channels (last
    axis) with the leading slice of weight and bias, zero beyond them.

    The channels split into blocks of ``unit`` = gcd(channels, widths) channels, viewed
    as (..., blocks, unit): every choice is a run of whole blocks. Each block's mean and
    variance, combined, give every choice's mean_k and rstd_k. A block in choice segment j
    (its channels in choices j, j+1, ... alone) sees every choice k >= j, so there the
    mixture is affine in x: y = (x * A_j - B_j) * weight + H_j * bias, with
    A_j = sum_{k>=j} g_k rstd_k, B_j = sum_{k>=j} g_k mean_k rstd_k, H_j = sum_{k>=j} g_k;
    and so is its gradient (see backward). The full-size work is a few contiguous passes
    over x, whatever the number of choices; the per-choice algebra is on
    (rows, choices) tensors. Computed in float32 at least, returned in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, gates, weight, bias, widths, eps, channels_axis):
        ctx.channels_axis = channels_axis
        x = x.movedim(channels_axis, -1)  # the rows: (..., channels)
        compute = torch.promote_types(x.dtype, torch.float32)
        plan = _block_plan(widths, x.shape[-1], x.device, compute)
        blocks = x.unflatten(-1, (-1, plan.unit)).to(compute)  # (..., blocks, unit)
        block_mean, block_var = _block_moments(blocks)
        # Choice k's mean and variance over its blocks b (all of one size): the mean of the
        # blocks' variances plus the variance of their means, the means taken about block 0's
        # (exact where the mean is far from zero, unlike E[x^2] - mean^2).
        offset = block_mean - block_mean[..., :1]
        sums = _over_choices(torch.stack([offset, offset.square(), block_var], -2), plan) / plan.blocks_in
        offset_mean, offset_square, var_within = sums.unbind(-2)
        mean = block_mean[..., :1] + offset_mean
        var = var_within + (offset_square - offset_mean.square()).clamp_min(0)
        rstd = torch.rsqrt(var + eps)
        gates = gates.to(compute)
        scale, lower = _per_block(torch.stack([gates * rstd, -gates * rstd * mean], -2), plan).unbind(-2)
        normalised = torch.addcmul(lower.unsqueeze(-1), blocks, scale.unsqueeze(-1))  # (x * A - B)
        # Back in x's layout before the last op, which so gives a new tensor, not a view of
        # one: a view made in here may not be modified in place after (a ReLU's).
        normalised = normalised.flatten(-2).movedim(-1, channels_axis)
        if weight is None:
            mixed = normalised.clone()
        else:  # nn.LayerNorm has a bias only with a weight
            per_channel = (-1,) + (1,) * (-1 - channels_axis % x.dim() + x.dim())  # along channels_axis
            mixed = normalised * weight.view(per_channel) if bias is None else torch.addcmul(
                (_per_block(gates, plan).repeat_interleave(plan.unit) * bias).view(per_channel), normalised,
                weight.view(per_channel))
        ctx.save_for_backward(x, gates, weight, bias, mean, rstd)
        ctx.widths = widths
        return mixed.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        """With gw = dy * weight, P_k and Q_k the sums of gw and gw * x over choice k's
        channels, and R_k = rstd_k * (Q_k - mean_k * P_k) (the sum of gw times choice k's
        normalised x), the layer norm's gradient summed over the choices present in
        segment j is dx = gw * A_j + x * alpha_j + beta_j, where
        alpha_j = -sum_{k>=j} g_k rstd_k^2 R_k / N_k and
        beta_j = sum_{k>=j} g_k rstd_k (mean_k rstd_k R_k - P_k) / N_k (N_k = widths[k]).
        The gates' gradient is R_k summed over the rows, plus the bias over choice k's
        channels times dy summed over the rows."""
        x, gates, weight, bias, mean, rstd = ctx.saved_tensors  # x as rows, (..., channels)
        grad = grad.movedim(ctx.channels_axis, -1)
        compute = gates.dtype
        plan = _block_plan(ctx.widths, x.shape[-1], x.device, compute)
        rows = tuple(range(x.dim() - 1))  # of x, and of its (..., blocks, unit) view
        blocks = x.unflatten(-1, (-1, plan.unit)).to(compute)
        grad_blocks = grad.unflatten(-1, (-1, plan.unit)).to(compute)
        weighted = grad_blocks if weight is None else grad_blocks * weight.view(-1, plan.unit)
        P, Q = _over_choices(torch.stack([weighted.sum(-1), (weighted * blocks).sum(-1)], -2), plan).unbind(-2)
        R = rstd * (Q - mean * P)
        per_width = gates * rstd / plan.widths
        scale, lower, alpha, beta = _per_block(torch.stack([
            gates * rstd, -gates * rstd * mean, -per_width * rstd * R, per_width * (mean * rstd * R - P)], -2),
            plan).unsqueeze(-1).unbind(-3)
        grad_x = grad_gates = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(torch.addcmul(beta, blocks, alpha), weighted, scale).flatten(-2).to(x.dtype) \
                .movedim(-1, ctx.channels_axis)
        column_sums = None  # dy summed over the rows, (blocks, unit)
        if bias is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
            column_sums = grad_blocks.sum(rows)
        if ctx.needs_input_grad[1]:
            grad_gates = R.sum(rows)
            if bias is not None:  # each choice adds its bias over its own channels
                grad_gates = grad_gates + torch.cumsum(column_sums.flatten() * bias, 0)[plan.last_channels]
        if ctx.needs_input_grad[2] and weight is not None:
            normalised = torch.addcmul(lower, blocks, scale)
            grad_weight = (grad_blocks * normalised).sum(rows).flatten().to(weight.dtype)
        if ctx.needs_input_grad[3] and bias is not None:
            grad_bias = (_per_block(gates, plan).unsqueeze(-1) * column_sums).flatten().to(bias.dtype)
        return grad_x, grad_gates, grad_weight, grad_bias, None, None, None


def _block_moments(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's (last axis's) mean and variance. On a GPU one reduction, which serves
    many short rows per thread block (PyTorch's layer norm kernels give each row a block of
    its own). On a CPU from a layer norm without eps (rstd = var^-1/2, inf for a constant
    block: var 0), its output unused: on the 2-core development CPU torch.var_mean took
    7.1 ms over a (8, 56, 56, 24) slice of ConvNeXt-T's first stage, the layer norm 0.7 ms.
    Compiled, either is one reduction."""
    if blocks.device.type == "cuda":
        var, mean = torch.var_mean(blocks, dim=-1, correction=0)
        return mean, var
    _, mean, rstd = torch.native_layer_norm(blocks, blocks.shape[-1:], None, None, 0.0)
    return mean.squeeze(-1), rstd.squeeze(-1).pow(-2)


class _BlockPlan(NamedTuple):
    """How _MixedLayerNorm's widths split the channels, as tensors on one device."""

    unit: int                     # channels per block: gcd of the channels and the widths
    widths: torch.Tensor          # (K,) each choice's channels
    blocks_in: torch.Tensor       # (K,) each choice's blocks
    last_block: torch.Tensor      # (K,) index of each choice's last block
    last_channels: torch.Tensor   # (K,) index of each choice's last channel
    within: torch.Tensor          # (K, K) [j, k] = j <= k: choice k is in segment j
    segment_of_block: torch.Tensor  # (blocks,) the first choice a block is in; K for none


def _block_plan(widths: tuple[int, ...], channels: int, device: torch.device, dtype: torch.dtype) -> _BlockPlan:
    return device_constants(_make_block_plan, widths, channels, device, dtype)


def _make_block_plan(widths, channels, device, dtype) -> _BlockPlan:
    unit = math.gcd(channels, *widths)
    blocks_in = [w // unit for w in widths]
    segment_of_block = [next((k for k, n in enumerate(blocks_in) if b < n), len(widths))
                        for b in range(channels // unit)]
    tensor = functools.partial(torch.tensor, device=device)
    return _BlockPlan(unit, tensor(widths, dtype=dtype), tensor(blocks_in, dtype=dtype),
                      tensor([n - 1 for n in blocks_in]), tensor([w - 1 for w in widths]),
                      torch.ones(len(widths), len(widths), dtype=torch.bool, device=device).triu(),
                      tensor(segment_of_block))



def _over_choices(per_block: torch.Tensor, plan: _BlockPlan) -> torch.Tensor:
    """(..., blocks) -> (..., K): the sum over each choice's blocks (a prefix sum, read at
    each choice's last block)."""
    return per_block.cumsum(-1).index_select(-1, plan.last_block)


def _per_block(per_choice: torch.Tensor, plan: _BlockPlan) -> torch.Tensor:
    """(..., K) -> (..., blocks): for each block, the sum over the choices it is in (those k
    >= its segment j: a product with ``within``, not flip, cumsum, flip); 0 for a block no
    choice has."""
    from_here = (per_choice.unsqueeze(-2) * plan.within).sum(-1)
    return F.pad(from_here, (0, 1)).index_select(-1, plan.segment_of_block)
