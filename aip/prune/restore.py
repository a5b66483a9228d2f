"""A pruned model rebuilt from what a run saved: Torch-Pruning's history replayed on the unpruned model, then the
weights loaded. The one replay-and-load of `--resume`, `--from-stage`, the capacity analysis and the loaders of a
pruned model (`aip.load_pruned`, `load_pruned_detector`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from aip import checkpoint as ckpt
from aip.prune.pruner import ChannelPruner, History
from aip.prune.safety import first_line

STUDENT_WEIGHTS = f"{ckpt.STATE_DIR}/model.safetensors"  # a stage checkpoint's student, as Accelerate saved it

Weights = Path | dict[str, torch.Tensor]


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Load a stage checkpoint's student weights (`weights`: its directory) or a state dict into `model`; weights of
    another architecture are one line, not torch's list of every mismatched tensor."""
    where = "the saved weights"
    if not isinstance(weights, dict):
        where = str(Path(weights) / STUDENT_WEIGHTS)
        weights = load_file(where)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(
            f"{where} does not fit the model rebuilt from the pruning history ({first_line(exc)}); was it saved for "
            "another model?"
        ) from None


def restore_pruned(pruner: ChannelPruner, model: nn.Module, history: History, weights: Weights | None = None) -> None:
    """Give the unpruned `model` (traced by `pruner` itself or through its prunable view) the saved architecture by
    replaying `history`, then load `weights` (a stage checkpoint directory or a state dict) when given."""
    with torch.enable_grad():  # a removal that changes split sizes traces the model again, through autograd
        pruner.replay(history)
    if weights is not None:
        load_weights(model, weights)


def rebuild(
    model: nn.Module,
    prunable: tuple[nn.Module, torch.Tensor, list[nn.Module]],
    history: History,
    weights: Weights | None = None,
) -> nn.Module:
    """`model` (unpruned, changed in place) with the saved architecture and weights; `prunable` is what the task's
    `prunable(model, example)` gives: the module to trace, its example input and the layers never pruned."""
    view, example, ignored = prunable
    with warnings.catch_warnings(), torch.enable_grad():  # Torch-Pruning's notes on the trace are for a run
        warnings.simplefilter("ignore")
        restore_pruned(ChannelPruner(view, example, ignored), model, history, weights)
    return model
