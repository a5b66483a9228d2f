"""Sparsity training before the first prune: Torch-Pruning's group-norm regularisation (DepGraph, Fang et al. 2023)
pulls each prunable group's parameters towards zero, the least important groups hardest, so that what the first
prune removes has already shrunk."""

from __future__ import annotations

from collections.abc import Callable

import torch_pruning as tp

from aip.prune.pruner import ChannelPruner


def group_norm_regularizer(pruner: ChannelPruner, weight: float) -> Callable[[], None]:
    """A call that adds the group-norm regularisation's gradient (coefficient `weight`) to the gradients of the
    pruner's model, for the groups Torch-Pruning's `GroupNormPruner` finds (the pruner's ignored layers left alone);
    to be called after the backward pass and before the optimizer's step."""
    regularizer = tp.pruner.GroupNormPruner(
        pruner.model,
        pruner.example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        reg=weight,
        global_pruning=True,
        ignored_layers=pruner.ignored,
    )
    return lambda: regularizer.regularize(pruner.model)
