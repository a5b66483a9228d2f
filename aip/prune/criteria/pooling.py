"""What the criteria that record on calibration batches (`taylor`, `activation`) share: pooling their statistics
over processes, and the Torch-Pruning handlers that say which axis of a layer a group prunes.

They gather their recorded statistics from every process when a process group is running (or through the `gather`
callable they were given, such as `Accelerator.gather`) and pool them as if one process had run every process's
batches, so all processes rank the same channels even when their calibration batches differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch_pruning as tp

Gather = Callable[[torch.Tensor], torch.Tensor]  # a 1-D tensor from every process, concatenated in rank order

OUT_HANDLERS = (
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_batchnorm_out_channels,
    tp.prune_layernorm_out_channels,
    tp.prune_groupnorm_out_channels,
    tp.prune_instancenorm_out_channels,
)
IN_HANDLERS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
CONSUMER_HANDLERS = (*IN_HANDLERS, tp.prune_depthwise_conv_out_channels)  # layers that read the group's channels


def gather_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The 1-D tensor `t` of every process of the default process group, concatenated in rank order (`t` itself
    when there is no group, or one process). A collective call: every process must make it, so a criterion that
    records on one process only (rank-0 work) must be given `gather=lambda t: t`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_all(stats: dict, gather: Gather | None) -> dict:
    """Every tensor of `stats` from every process, stacked (processes, *shape), in one collective call. The keys
    and shapes must be the same on every process (the same model, the same number of calibration batches)."""
    if not stats:
        return stats
    keys = list(stats)
    flat = torch.cat([stats[k].detach().float().flatten() for k in keys])
    flat = (gather or gather_over_processes)(flat).cpu()
    flat = flat.view(-1, sum(stats[k].numel() for k in keys))
    out, at = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[:, at : at + n].reshape(-1, *stats[k].shape)
        at += n
    return out
