"""What a network costs: FLOPs from torch's own counter and the parameter count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aip.hooks import inspecting


@dataclass(frozen=True)
class Cost:
    flops: int
    params: int


def positions(module: nn.Module, out: torch.Tensor) -> int:
    """Output positions per image and channel: H x W of a convolution's map, and of a linear layer applied to every
    position of a channels-last map (N, H, W, C), as ConvNeXt's blocks do; 1 for a plain (N, C) linear layer."""
    channels = out.shape[-1] if isinstance(module, nn.Linear) else out.shape[1]
    return max(1, out.numel() // max(1, out.shape[0] * channels))


@torch.no_grad()
def model_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """FLOPs of one forward of `example` (batch 1 recommended) and the parameter count; the mode is restored."""
    with inspecting(model), FlopCounterMode(display=False) as counter:
        model(example)
    return Cost(flops=int(counter.get_total_flops()), params=sum(p.numel() for p in model.parameters()))
