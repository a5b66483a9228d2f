"""The final pruned model as a standalone `torch.export` file that loads and runs without aip installed."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` in eval mode on the CPU, batch dimension dynamic, to `path` (`.pt2`).

    Load it with `torch.export.load(path).module()`; the graph holds plain aten ops, no aip classes.
    """
    model = copy.deepcopy(model).float().cpu().eval()
    example = example.float().cpu()
    if example.shape[0] < 2:  # a batch of 1 would be specialised; 2 lets the dimension stay symbolic
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    torch.export.save(program, path)
    return path
