"""Architectures as width vectors: the cost of any per-group width assignment, without building the network.

A width vector gives one width per prunable group (coupled layers share it). Every conv and linear layer takes its
output width from the group that prunes its outputs and its input width from the group that prunes its inputs (or
keeps its original size when no group does: the image channels, the classifier's classes). FLOPs follow
`torch.utils.flop_counter` (2 x multiply-accumulates of convolutions and matrix products), parameters count weights,
biases and BatchNorm affine pairs, so a search can price candidate structures by arithmetic alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aip.hooks import inspecting
from aip.prune.cost import positions
from aip.prune.pruner import ChannelPruner


@dataclass
class _Layer:
    out_group: str | None
    in_group: str | None
    out_size: int
    in_size: int
    per_pair_flops: float  # FLOPs per (input channel, output channel) pair
    per_pair_params: float
    bias: bool
    depthwise: bool


class WidthCost:
    """FLOPs and parameters of the pruner's model for any width vector (dict: group name -> width)."""

    def __init__(self, pruner: ChannelPruner) -> None:
        model, graph = pruner.model, pruner.graph
        spatial: dict[nn.Module, int] = {}
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

        def keep(mod: nn.Module, _i: object, out: torch.Tensor) -> None:
            spatial[mod] = positions(mod, out)

        with inspecting(model, dict.fromkeys(layers, keep)), torch.no_grad():
            model(pruner.example)

        out_group: dict[nn.Module, str] = {}
        in_group: dict[nn.Module, str] = {}
        self.bn_groups: dict[str, int] = {}
        for g in pruner._groups():
            name, group = g.name, g.group
            for item in group:
                module = item.dep.target.module
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                        self.bn_groups[name] = self.bn_groups.get(name, 0) + 1
                    out_group.setdefault(module, name)
                else:
                    in_group.setdefault(module, name)
        self.layers = []
        for m in layers:
            if m not in spatial:
                continue
            if isinstance(m, nn.Conv2d):
                kk = m.kernel_size[0] * m.kernel_size[1]
                depthwise = m.groups > 1 and m.groups == m.in_channels
                per_pair = kk / (1 if depthwise else m.groups)
                out_size, in_size = m.out_channels, m.in_channels
            else:
                per_pair, depthwise = 1.0, False
                out_size, in_size = m.out_features, m.in_features
            self.layers.append(
                _Layer(
                    out_group.get(m),
                    None if depthwise else in_group.get(m),
                    out_size,
                    in_size,
                    2.0 * per_pair * spatial[m],
                    per_pair,
                    m.bias is not None,
                    depthwise,
                )
            )
        self.original = pruner.widths()
        self.bn_fixed = sum(
            2 * m.num_features
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m not in out_group
        )

    def cost(self, widths: dict[str, int | float]) -> tuple[float, float]:
        """(FLOPs, parameters) of the model with the given group widths (missing groups keep theirs)."""
        flops = params = 0.0
        for layer in self.layers:
            out = widths.get(layer.out_group, layer.out_size) if layer.out_group else layer.out_size
            inp = (
                1
                if layer.depthwise
                else (widths.get(layer.in_group, layer.in_size) if layer.in_group else layer.in_size)
            )
            flops += layer.per_pair_flops * out * inp
            params += layer.per_pair_params * out * inp + (out if layer.bias else 0)
        params += sum(2 * count * widths.get(name, self.original[name]) for name, count in self.bn_groups.items())
        return flops, params + self.bn_fixed

    def of(self, widths: dict[str, int | float], metric: str) -> float:
        flops, params = self.cost(widths)
        return flops if metric == "flops" else params
