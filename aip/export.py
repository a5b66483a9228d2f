"""The final pruned model as a standalone `torch.export` file that loads and runs without aip installed.

The file is written under a temporary name and renamed into place, so a run killed while exporting leaves either
the previous file or none, never a truncated one beside a finished report. The model is exported in fp32 without
the autocast wrapper Accelerate puts on a model prepared for mixed precision.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

EXPORT_FILE = "model_pruned.pt2"


def plain_fp32(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in fp32 on the CPU, in eval mode, with its class's own `forward`.

    Accelerate's mixed precision replaces `forward` by an instance attribute (autocast plus a cast of the outputs
    to fp32) and keeps the original as `_original_forward`; both are dropped, or the export would carry autocast.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if module is model or "_original_forward" in module.__dict__:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_original_forward", None)
    return model.float().cpu().eval()


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` in eval mode on the CPU, batch dimension dynamic, to `path` (`.pt2`), atomically.

    Load it with `torch.export.load(path).module()`; the graph holds plain aten ops, no aip classes.
    """
    model = plain_fp32(model)
    example = example.float().cpu()
    if example.shape[0] < 2:  # a batch of 1 would be specialised; 2 lets the dimension stay symbolic
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # torch.export wants the suffix
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_loads(path: str | Path) -> bool:
    """Whether `path` holds an export that `torch.export.load` reads (a missing, empty or damaged file does not)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001 - whatever a damaged archive raises, it is not a usable export
        return False
    return True
