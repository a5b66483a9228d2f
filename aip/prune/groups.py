"""The prunable channel groups of a model, read off Torch-Pruning's dependency graph.

Enumerated root by root like `DependencyGraph.get_all_groups`, except that a root whose channels the graph cannot
map (an exception inside its index mapping) is reported with the reason instead of stopping the whole enumeration.
Each group's `unit` follows Torch-Pruning's pruners: a grouped convolution (or GroupNorm) loses the same channel of
every channel group; a tensor chunked into equal pieces loses the same channel of every piece; a root whose channel
comes back to it at other positions (a concatenation of a layer with a depthwise copy of it, as in GhostNet) loses
those positions with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from aip.prune.safety import refusal_reason, split_pieces

ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)


@dataclass
class PrunableGroup:
    """One group of coupled channels, named by its root layer; `unit` channels go together."""

    name: str
    root: nn.Module
    group: tp.dependency.Group
    unit: int

    @property
    def width(self) -> int:
        return len(self.group[0].idxs)

    def channels(self, units: list[int]) -> list[int]:
        """The channel indices of the given units (unit j: channel j of every piece)."""
        step = self.width // self.unit
        return sorted(j + g * step for j in units for g in range(self.unit))

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-channel scores averaged over the pieces of each unit (as Torch-Pruning's pruners do)."""
        return scores.view(self.unit, -1).mean(dim=0)


def channel_groups(graph: tp.DependencyGraph, group: tp.dependency.Group) -> int:
    """How many channel groups the group's layers keep (BasePruner's rule: the largest; depthwise layers aside)."""
    count = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels:
            continue  # depthwise: one channel per group, pruned whole
        handler = graph.get_pruner_of_module(module)
        if handler is None:
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        count = max(count, handler.get_out_channel_groups(module) if out else handler.get_in_channel_groups(module))
    return count


def enumerate_groups(
    graph: tp.DependencyGraph, ignored: list[nn.Module]
) -> Iterator[tuple[str, nn.Module, tp.dependency.Group | None, int, str | None]]:
    """(root name, root, group, unit, reason to leave it) for every group with a conv or linear root; `group` is
    None when the graph cannot map the root's channels."""
    skip = set(ignored) | set(graph.IGNORED_LAYERS_IN_TRACING)
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if module in skip or module in visited or not isinstance(module, ROOT_TYPES):
            continue
        handler = graph.get_pruner_of_module(module)
        if handler is None or handler.get_out_channels(module) is None:
            continue
        name = graph._module2name[module]
        try:
            group = graph.get_pruning_group(
                module, handler.prune_out_channels, list(range(handler.get_out_channels(module)))
            )
        except Exception as exc:  # Torch-Pruning's index mapping: whatever it raises, it did not understand
            yield name, module, None, 1, f"the graph cannot map its channels ({type(exc).__name__}: {exc})"
            continue
        members = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        visited.update(members)
        if any(m in skip for m in members):
            continue
        reason = refusal_reason(group)
        unit = channel_groups(graph, group)
        pieces = split_pieces(group)
        if pieces is None:
            reason = reason or "a split of its channels into unequal or partial pieces"
        else:
            unit = math.lcm(unit, pieces)
        if reason is None:
            closure, why = coupled_positions(graph, module, handler, len(group[0].idxs))
            reason = why
            unit = math.lcm(unit, closure)
        if reason is None and len(group[0].idxs) % unit:
            reason = f"{len(group[0].idxs)} channels do not divide into {unit} equal channel groups"
        yield name, module, group, unit, reason


def coupled_positions(
    graph: tp.DependencyGraph, root: nn.Module, handler: tp.pruner.BasePruningFunc, width: int
) -> tuple[int, str | None]:
    """How many of the root's own channels Torch-Pruning removes with its first channel (k, evenly spaced: channel j
    goes with j + width/k, j + 2 width/k, ...), and a reason to leave the group when they are not so spaced."""
    try:
        probe = graph.get_pruning_group(root, handler.prune_out_channels, [0])
    except Exception as exc:  # Torch-Pruning's index mapping: whatever it raises, it did not understand
        return 1, f"the graph cannot map its channels ({type(exc).__name__}: {exc})"
    taken = sorted({int(i) for i in probe[0].idxs})
    k = len(taken)
    if k == 1:
        return 1, None
    if width % k or taken != [g * (width // k) for g in range(k)]:
        return 1, f"removing its channel 0 removes channels {taken[:6]} too, not evenly spaced"
    return k, None
