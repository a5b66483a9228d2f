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


@torch.no_grad()
def model_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """FLOPs of one forward of `example` (batch 1 recommended) and the parameter count; the mode is restored."""
    with inspecting(model), FlopCounterMode(display=False) as counter:
        model(example)
    return Cost(flops=int(counter.get_total_flops()), params=sum(p.numel() for p in model.parameters()))
