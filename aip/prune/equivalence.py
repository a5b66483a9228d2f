"""An independent check that a pruning history keeps the network's function, step by step.

The history is replayed on an untouched copy of the model. Before each step the channels about to go are masked at
the inputs of the layers that read them (forward pre-hooks on activations, not the pruner's own weight zeroing);
the masked output must equal the output after the channels are removed. Used by the tests and the coverage benchmark.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from aip.prune.pruner import ChannelPruner, History
from aip.prune.safety import outputs


def _mask_inputs(graph: tp.DependencyGraph, group: tp.dependency.Group) -> list:
    """Pre-hooks that zero, at every layer reading the group's channels, exactly those input channels."""
    handles = []
    for item in group:
        module, idxs = item.dep.target.module, list(item.idxs)
        if not graph.is_in_channel_pruning_fn(item.dep.handler) or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1:
            continue  # depthwise: the channel passes through to layers further on, which are in the group too

        def hook(mod: nn.Module, args: tuple, idxs: list[int] = idxs) -> tuple:
            x = args[0].clone()
            if isinstance(mod, nn.Linear):
                x[..., idxs] = 0
            else:
                x[:, idxs] = 0
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def replay_deviation(
    original: nn.Module, history: History, example: torch.Tensor, ignored: list[str]
) -> tuple[nn.Module, float]:
    """Replay `history` on a copy of `original` with the masking check at every step.

    Returns the pruned copy and the largest deviation seen, relative to each output's scale (0 means every step
    computed exactly what the masked network computed). `ignored` names the layers the pruner left alone.
    """
    model = copy.deepcopy(original).eval()
    worst = 0.0
    pruner = None
    for name, is_out, idxs in history:
        if pruner is None or pruner._has_splits:  # traced afresh where split sizes must be current
            pruner = ChannelPruner(model, example, [model.get_submodule(n) for n in ignored])
        module = model.get_submodule(name)
        handler = pruner.graph.get_pruner_of_module(module)
        group = pruner.graph.get_pruning_group(
            module, handler.prune_out_channels if is_out else handler.prune_in_channels, idxs
        )
        handles = _mask_inputs(pruner.graph, group)
        try:
            masked = outputs(model, example)
        finally:
            for h in handles:
                h.remove()
        group.prune(record_history=False)
        for a, b in zip(masked, outputs(model, example), strict=True):
            if a.shape != b.shape:
                return model, float("inf")
            worst = max(worst, float((a - b).abs().max()) / max(float(a.abs().max()), 1e-6))
    return model, worst
