"""Architectures as width vectors: the cost of any per-group width assignment, without building the network.

A width vector gives one width per prunable group (coupled layers share it). Each conv and linear layer's output and
input width is a linear function of the group widths: its size when the table was built, plus, for every group that
prunes that side, the group's change times the share of the group's channels the layer holds (1 for a plain layer,
1/2 for each half of a chunked tensor, a part of a concatenation's inputs). FLOPs follow `torch.utils.flop_counter`
(2 x multiply-accumulates of convolutions and matrix products), parameters count weights, biases and the
per-channel parameters (BatchNorm's affine pair) of the groups' other layers, so a search can price candidate
structures by arithmetic alone, and the pruner can price each removal without a forward pass. Transposed
convolutions and functional matrix products are not priced: the pruner compares `current_flops` with torch's
counter once and falls back to the counter where they differ.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from aip.hooks import inspecting
from aip.prune.cost import positions

if TYPE_CHECKING:
    from aip.prune.pruner import ChannelPruner

PRICED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class _Layer:
    module: nn.Module
    out_size: int  # sizes when the table was built
    in_size: int
    per_pair: float  # multiply-accumulates per (input, output) channel pair and output position
    positions: int  # output positions per image
    bias: bool
    depthwise: bool  # every output channel reads its own input channel: the input width does not count
    out_terms: dict[str, float] = field(default_factory=dict)  # group -> share of its channels on this side
    in_terms: dict[str, float] = field(default_factory=dict)

    def live(self) -> tuple[int, int]:
        """The layer's (output, input) width now."""
        m = self.module
        if isinstance(m, nn.Linear):
            return m.out_features, m.in_features
        return m.out_channels, m.in_channels

    def macs(self, out: float, inp: float) -> tuple[float, float]:
        """(multiply-accumulates per position, parameters) at the given widths."""
        pairs = self.per_pair * out * (1 if self.depthwise else inp)
        return pairs, pairs + (out if self.bias else 0)


def _layer(module: nn.Module, spatial: int) -> _Layer:
    if isinstance(module, nn.Linear):
        return _Layer(module, module.out_features, module.in_features, 1.0, spatial, module.bias is not None, False)
    kernel = math.prod(module.kernel_size)
    depthwise = module.groups > 1 and module.groups == module.in_channels
    per_pair = kernel / (1 if depthwise else module.groups)
    bias = module.bias is not None
    return _Layer(module, module.out_channels, module.in_channels, per_pair, spatial, bias, depthwise)


class WidthCost:
    """FLOPs and parameters of the pruner's model for any width vector (dict: group name -> width)."""

    def __init__(self, pruner: ChannelPruner) -> None:
        model, graph = pruner.model, pruner.graph
        spatial: dict[nn.Module, int] = {}
        supported = [m for m in model.modules() if isinstance(m, PRICED)]

        def keep(mod: nn.Module, _i: object, out: torch.Tensor) -> None:
            spatial[mod] = spatial.get(mod, 0) + positions(mod, out)  # a shared head runs once per level

        with inspecting(model, dict.fromkeys(supported, keep)), torch.no_grad():
            model(pruner.example)
        example = pruner.example
        # images in the example: current_flops counts them all, as torch's counter does
        self.batch = int(example.shape[0]) if isinstance(example, torch.Tensor) and example.dim() > 1 else 1
        self.layers = [_layer(m, spatial[m]) for m in supported if m in spatial]
        by_module = {layer.module: layer for layer in self.layers}
        self.original: dict[str, int] = {}
        self.extra: dict[str, float] = defaultdict(float)  # per-channel parameters of the group's other layers
        for g in pruner._groups(include_refused=True):
            self.original[g.name] = g.width
            for module, out, share in _shares(graph, g.group, g.width):
                if module in by_module:
                    terms = by_module[module].out_terms if out else by_module[module].in_terms
                    terms[g.name] = max(terms.get(g.name, 0.0), share)
                elif out and isinstance(module, nn.Module):
                    own = sum(p.numel() for p in module.parameters(recurse=False))
                    channels = graph.get_out_channels(module) or 0
                    if own and channels:
                        self.extra[g.name] += own / channels * share
        self.params_at_build = sum(p.numel() for p in model.parameters())
        self._at_build = sum(layer.macs(layer.out_size, layer.in_size)[1] for layer in self.layers)

    def _sizes(self, layer: _Layer, widths: dict[str, int | float]) -> tuple[float, float]:
        def size(base: int, terms: dict[str, float]) -> float:
            return base + sum(s * (widths.get(n, self.original[n]) - self.original[n]) for n, s in terms.items())

        return size(layer.out_size, layer.out_terms), size(layer.in_size, layer.in_terms)

    def cost(self, widths: dict[str, int | float]) -> tuple[float, float]:
        """(FLOPs of one image, parameters) of the model with the given group widths (missing groups keep theirs)."""
        flops = layer_params = 0.0
        for layer in self.layers:
            macs, params = layer.macs(*self._sizes(layer, widths))
            flops += 2.0 * macs * layer.positions
            layer_params += params
        extra = sum(c * (widths.get(n, self.original[n]) - self.original[n]) for n, c in self.extra.items())
        return flops, self.params_at_build - self._at_build + layer_params + extra

    def of(self, widths: dict[str, int | float], metric: str) -> float:
        """The FLOPs (of one image) or parameters of the model with the given group widths."""
        flops, params = self.cost(widths)
        return flops if metric == "flops" else params

    def current_flops(self) -> float:
        """FLOPs of one forward of the pruner's example as the model stands now, read off the layers' live widths."""
        return self.batch * sum(2.0 * layer.macs(*layer.live())[0] * layer.positions for layer in self.layers)

    def pricer(self, metric: str) -> Pricer:
        """A pricer of removals from the model as it stands now, in the units of `current_flops` (or parameters)."""
        return Pricer(self, metric)


class Pricer:
    """What removing channels of a group saves under the analytic model, given the removals already taken; exact
    for the layers the table prices (so one removal step meets a FLOPs target), an estimate elsewhere."""

    def __init__(self, table: WidthCost, metric: str) -> None:
        self.metric = metric
        self.scale = table.batch if metric == "flops" else 1
        self.sizes = {i: tuple(map(float, layer.live())) for i, layer in enumerate(table.layers)}
        self.layers = table.layers
        self.extra = table.extra if metric == "params" else {}
        self.touches: dict[str, list[int]] = defaultdict(list)
        for i, layer in enumerate(table.layers):
            for name in {*layer.out_terms, *layer.in_terms}:
                self.touches[name].append(i)

    def _value(self, i: int, out: float, inp: float) -> float:
        layer = self.layers[i]
        macs, params = layer.macs(out, inp)
        return 2.0 * macs * layer.positions * self.scale if self.metric == "flops" else params

    def _after(self, i: int, name: str, channels: int) -> tuple[float, float]:
        layer, (out, inp) = self.layers[i], self.sizes[i]
        return out - layer.out_terms.get(name, 0.0) * channels, inp - layer.in_terms.get(name, 0.0) * channels

    def peek(self, name: str, channels: int) -> float:
        """The cost that removing `channels` more channels of group `name` saves."""
        saved = self.extra.get(name, 0.0) * channels
        for i in self.touches.get(name, []):
            saved += self._value(i, *self.sizes[i]) - self._value(i, *self._after(i, name, channels))
        return saved

    def take(self, name: str, channels: int) -> None:
        """Account for removing `channels` channels of group `name`."""
        for i in self.touches.get(name, []):
            self.sizes[i] = self._after(i, name, channels)


def _shares(graph: object, group: object, width: int) -> list[tuple[object, bool, float]]:
    """(module, is the output side, share of the group's channels it holds) for each layer of a dependency group."""
    seen: dict[tuple[int, bool], tuple[object, set[int]]] = {}
    for item in group:
        dep = item.dep
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if not out and not graph.is_in_channel_pruning_fn(dep.handler):
            continue
        module = dep.target.module
        seen.setdefault((id(module), out), (module, set()))[1].update(int(i) for i in item.idxs)
    return [(module, out, len(idxs) / max(1, width)) for (_, out), (module, idxs) in seen.items()]
