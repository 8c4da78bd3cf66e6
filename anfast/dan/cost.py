"""Differentiable expected FLOPs and parameters of the searched student.

    E[F] = 2 * sum_layers k^2 * H_out * W_out * E[c_in] * E[c_out] / groups

with E[c] = sum_i g_i * width_i for a searched group and the full width for any other
(fixed, or reduced over: see anfast.dan.space). The factor 2 and the layers counted
follow anfast.profile (torch.utils.flop_counter: a multiply-add is 2 FLOPs; convs, linears
and matmuls count, bias adds and norms do not; ECA's Conv1d and GC's matmul along the
channels add FLOPs linear in their group's width), so with one-hot gates the model
equals anfast.profile of the derived student exactly. Parameters count conv / linear weights
and biases, the affine parameters of norms and the per-channel parameters students
slice (ConvNeXt's gamma), as anfast.count_parameters does.

Both counts are polynomials of degree <= 2 in the searched widths. When every group
draws its choice independently from p = softmax(theta), ``moments`` gives the exact
E_p[cost] and E_p[cost^2], so ``expected_penalty`` is the exact expected penalty of a
sampled architecture, E_p[(cost / (target * base) - 1)^2] = bias^2 + variance. The
variance term is what makes the derived (argmax) student meet the target: a penalty
on E_p[cost] alone is met by a spread-out p whose argmax is far from the target.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from anfast.adjoin import AdjoinedNetwork
from anfast.dan.space import SearchSpace
from anfast.export import export_base
from anfast.nn.modes import eval_mode
from anfast.profile import profile

__all__ = ["CostModel"]


_NORMS = ("norm", "layernorm", "groupnorm")  # a weight and a bias per channel, no FLOPs counted


@dataclass(frozen=True)
class _Layer:
    kind: str  # "conv", "linear", "norm" (a batch norm), "layernorm" or "groupnorm"
    # Indices into the cost model's channel vector: one group, or a concat's parts (its
    # channels are their sum; a norm over a concat has them as outputs too).
    in_groups: tuple[int, ...]
    out_groups: tuple[int, ...]
    in_features_per_channel: int  # > 1 for a linear after flatten(C x H x W)
    kernel: int  # kh * kw for convs, 1 for linears
    positions: int  # H_out * W_out for convs, 1 for linears, summed over the layer's calls
    in_per_group: int  # C_in / groups of a grouped conv (its student keeps whole groups), else 0
    bias: bool

    @property
    def norm_parameters(self) -> int:
        """A norm's parameters per channel: a weight and a bias (a LayerNorm may lack the bias)."""
        return 1 + (self.kind == "norm" or self.bias)


class CostModel:
    """Expected FLOPs / params of the student for given gate weights; exact for one-hot gates.

    Build it once per search with the network, its SearchSpace and the input size;
    ``base`` holds anfast.profile's count of the base network.
    """

    def __init__(self, network: AdjoinedNetwork, space: SearchSpace, input_size: Sequence[int]):
        self.space = space
        searched = {name: i for i, name in enumerate(space.group_names)}
        # Full width in every student: the unsearched groups.
        fixed = {g.name: g.channels for g in network.width_groups if g.name not in searched}
        index = {**searched, **{name: len(searched) + i for i, name in enumerate(fixed)}}
        self._fixed_channels = torch.tensor(list(fixed.values()), dtype=torch.float64)
        channels = {g.name: g.channels for g in network.width_groups}
        positions = _output_positions(network, input_size)
        modules = dict(network.named_modules())
        self._layers = []
        for name, widths in network.layer_widths.items():
            module = modules[name]
            if (widths.kind in ("norm", "groupnorm") and not module.affine) or (
                    widths.kind == "layernorm" and not module.elementwise_affine) or widths.kind == "grn":
                continue  # no parameters, or (GRN's) counted as channel vectors
            grouped = widths.kind == "conv" and module.groups > 1
            in_parts, out_parts = (widths.in_parts if group == "concat" else (group,)
                                   for group in (widths.in_group, widths.out_group))
            self._layers.append(_Layer(
                kind=widths.kind,
                in_groups=tuple(index[part] for part in in_parts),
                out_groups=tuple(index[part] for part in out_parts),
                in_features_per_channel=widths.in_channels // sum(channels[part] for part in in_parts),
                kernel=module.kernel_size[0] * module.kernel_size[1] if widths.kind == "conv" else 1,
                positions=positions[name] if widths.kind in ("conv", "linear") else 1,
                in_per_group=module.in_channels // module.groups if grouped else 0,
                bias=widths.kind != "norm" and module.bias is not None,
            ))
        # A per-channel parameter each student slices (ConvNeXt's gamma): one weight per channel.
        self._vectors = [index[group] for _, group in network.channel_vectors.values()]
        # ECA's Conv1d and GC's matmul along a group's channels: FLOPs per channel.
        self._channel_ops = [(index[group], flops) for parts in network.channel_ops.values() for group, flops in parts]
        self.base = profile(export_base(network), input_size)
        full_width = self._modelled_widths(torch.cat([
            torch.tensor([g.channels for g in space.groups], dtype=torch.float64), self._fixed_channels]))
        # Work outside convs and linears (none in torchvision CNNs) and parameters of other
        # modules (which adjoin keeps at full width) enter as constants.
        self._constant = {k: self.base[k] - full_width[k] for k in ("flops", "params")}
        self._polynomials = self._polynomial_form()

    def to(self, device: Union[str, torch.device]) -> "CostModel":
        """Keep the model's tensors (and its space's widths and mask tables) on ``device``,
        where the search's steps evaluate it, so no step copies them there; returns self."""
        self.space.to(device)
        self._fixed_channels = self._fixed_channels.to(device)
        self._polynomials = {kind: (exponents.to(device), coefficients.to(device))
                             for kind, (exponents, coefficients) in self._polynomials.items()}
        return self

    def moments(self, probabilities: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"flops": (E[F], E[F^2]), "params": (...)} as fractions of the base's count.

        Each group draws choice i with probability ``probabilities[g, i]`` (rows on the
        simplex), independently of the other groups; exact, and differentiable in
        ``probabilities``.
        """
        widths = self.space.widths.to(device=probabilities.device, dtype=torch.float64)
        powers = widths[..., None] ** torch.arange(5, device=widths.device, dtype=torch.float64)
        # raw[g, n] = E[width_g^n]; degree-2 monomials squared need up to the 4th moment.
        raw = torch.einsum("gk,gkn->gn", probabilities.double(), powers)
        groups = torch.arange(raw.shape[0], device=raw.device)
        result = {}
        for kind, (exponents, coefficients) in self._polynomials.items():
            exponents, coefficients = exponents.to(raw.device), coefficients.to(raw.device)
            mean = (coefficients * raw[groups, exponents].prod(dim=-1)).sum()
            pairs = exponents[:, None, :] + exponents[None, :, :]
            second = (coefficients[:, None] * coefficients[None, :] * raw[groups, pairs].prod(dim=-1)).sum()
            result[kind] = (mean, second)
        return result

    def expected_penalty(self, probabilities: torch.Tensor, kind: str, target: float) -> dict[str, torch.Tensor]:
        """E_p[(cost / (target * base) - 1)^2] and E_p[cost] / base for one cost ``kind``.

        Returns {"penalty", "mean"}, float64 scalars differentiable in ``probabilities``.
        """
        if kind not in self._polynomials:
            raise ValueError(f"cost kind {kind!r}: expected 'flops' or 'params'")
        mean, second = self.moments(probabilities)[kind]
        penalty = second / target**2 - 2 * mean / target + 1
        return {"penalty": penalty.clamp_min(0.0), "mean": mean}

    def _polynomial_form(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each count as monomials: (exponents (terms, groups), coefficients (terms,)).

        Coefficients are divided by the base's count, so the moments are fractions and
        stay well inside float64 when squared.
        """
        searched = len(self.space.groups)
        terms: dict[str, dict[tuple, float]] = {"flops": defaultdict(float), "params": defaultdict(float)}

        def channels(index: int, factor: float = 1.0) -> tuple[float, tuple[int, ...]]:
            if index < searched:
                return factor, (index,)
            return factor * float(self._fixed_channels[index - searched]), ()

        def add(kind: str, coefficient: float, *factors: tuple[float, tuple[int, ...]]) -> None:
            exponent = [0] * searched
            for scale, groups in factors:
                coefficient *= scale
                for g in groups:
                    exponent[g] += 1
            terms[kind][tuple(exponent)] += coefficient

        for group in self._vectors:
            add("params", 1.0, channels(group))
        for group, per_channel in self._channel_ops:
            add("flops", float(per_channel), channels(group))
        for layer in self._layers:
            if layer.kind in _NORMS:
                for group in layer.out_groups:
                    add("params", float(layer.norm_parameters), channels(group))
                continue
            (c_out,) = (channels(group) for group in layer.out_groups)
            # A concat's channels are the sum of its parts': one monomial per part.
            for c_in in ([(float(layer.in_per_group), ())] if layer.in_per_group
                         else [channels(group, float(layer.in_features_per_channel)) for group in layer.in_groups]):
                add("flops", 2.0 * layer.kernel * layer.positions, c_in, c_out)
                add("params", float(layer.kernel), c_in, c_out)
            if layer.bias:
                add("params", 1.0, c_out)
        forms = {}
        for kind, monomials in terms.items():
            monomials[(0,) * searched] += float(self._constant[kind])
            exponents = torch.tensor(list(monomials), dtype=torch.long).reshape(len(monomials), searched)
            coefficients = torch.tensor(list(monomials.values()), dtype=torch.float64) / self.base[kind]
            forms[kind] = (exponents, coefficients)
        return forms

    def expected(self, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"flops", "params"} as float64 scalars, differentiable in ``gates`` (groups, choices)."""
        modelled = self._modelled(gates)
        return {k: modelled[k] + self._constant[k] for k in modelled}

    def exact(self, choice_index: torch.Tensor) -> dict[str, int]:
        """The derived student's counts for one choice index per group."""
        one_hot = torch.nn.functional.one_hot(choice_index.cpu(), len(self.space.choices)).double()
        return {k: int(round(float(v))) for k, v in self.expected(one_hot).items()}

    def fraction(self, counts: dict) -> dict[str, torch.Tensor]:
        """Counts as fractions of the base's."""
        return {k: counts[k] / self.base[k] for k in ("flops", "params")}

    def _modelled(self, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        widths = self.space.widths.to(device=gates.device, dtype=torch.float64)
        searched = (gates.double() * widths).sum(dim=1)
        return self._modelled_widths(torch.cat([searched, self._fixed_channels.to(gates.device)]))

    def _modelled_widths(self, channels: torch.Tensor) -> dict[str, torch.Tensor]:
        flops = sum((per_channel * channels[group] for group, per_channel in self._channel_ops), channels.new_zeros(()))
        params = sum((channels[group] for group in self._vectors), channels.new_zeros(()))
        for layer in self._layers:
            c_out = sum(channels[group] for group in layer.out_groups)
            if layer.kind in _NORMS:
                params = params + layer.norm_parameters * c_out
                continue
            c_in = layer.in_per_group if layer.in_per_group else (
                sum(channels[group] for group in layer.in_groups) * layer.in_features_per_channel)
            flops = flops + 2 * layer.kernel * layer.positions * c_in * c_out
            params = params + layer.kernel * c_in * c_out + (c_out if layer.bias else 0)
        return {"flops": flops, "params": params}


def _output_positions(network: AdjoinedNetwork, input_size: Sequence[int]) -> dict[str, int]:
    """Where each conv and linear applies its weight in one forward pass at batch 1: H_out *
    W_out of a conv, 1 for a linear on (N, F) and H * W for one on ConvNeXt's (N, H, W, C),
    summed over the calls of a layer called more than once (CBAM's channel MLP runs on the
    average- and on the max-pooled map)."""
    sizes: dict[str, int] = {}

    def count(name: str, out: tuple, axis: int) -> None:
        sizes[name] = sizes.get(name, 0) + out[0][0].numel() // out[0].shape[axis]  # batch 1: positions

    hooks = [module.register_forward_hook(
                 lambda m, args, out, name=name: count(name, out, -1 if isinstance(m, nn.Linear) else 1))
             for name, module in network.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    parameter = next(network.parameters())
    try:
        with eval_mode(network), torch.no_grad():
            network(torch.zeros(1, *input_size[-3:], device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes
