"""The AIP authors' criterion (`activation`): the channels the next layers hardly ever see fire go first."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn

from aip.config import PruneConfig
from aip.prune.criteria.pooling import CONSUMER_HANDLERS, Gather, gather_all
from aip.prune.criteria.registry import register_importance


class ActivationImportance(tp.importance.Importance):
    """Mean absolute input of each channel to the layers that read it, on calibration batches, relative to the
    0.9-quantile of those layers' channel means.

    The AIP authors' criterion: a channel that hardly ever fires carries little. What counts is what the next layer
    sees, after whatever activation sits between (a BatchNorm output of -100 is a dead channel after a ReLU, not the
    strongest one), so the inputs of the group's consumer layers (those whose input channels it prunes) are recorded
    by forward pre-hooks; the group's score per channel is the mean over its consumers. Each consumer's means are
    divided by their 0.9-quantile rather than their maximum, so one outlier channel cannot push every other under
    the threshold: 1 is a typical strong channel of the layer, 0 a channel that never fires (the top tenth score
    above 1). `prune.activation.mode: threshold` removes every channel under a fixed fraction of that, held as
    `prune_threshold` (None in mode fraction: the schedule's share goes instead). The means pool every process's
    calibration batches (see `gather_over_processes`).
    """

    needs_features = True
    quantile = 0.9

    def __init__(self, gather: Gather | None = None, prune_threshold: float | None = None) -> None:
        self.gather = gather
        self.prune_threshold = prune_threshold
        self.means: dict[nn.Module, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Accumulate the per-channel mean |input| of every conv and linear layer while open."""
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def keep(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float().abs()
            flat = x.flatten(0, -2) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
            sums[module] = sums.get(module, 0) + flat.sum(dim=0)
            counts[module] = counts.get(module, 0) + flat.shape[0]

        kinds = (nn.modules.conv._ConvNd, nn.Linear)
        hooks = [m.register_forward_pre_hook(keep) for m in model.modules() if isinstance(m, kinds)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        stats = {
            m: torch.cat([total, torch.tensor([float(counts[m])], device=total.device)]) for m, total in sums.items()
        }
        self.means = {
            m: (every[:, :-1].sum(0) / every[:, -1].sum()) for m, every in gather_all(stats, self.gather).items()
        }

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        width = len(group[0].idxs)
        parts = []
        for item in group:
            module = item.dep.target.module
            if item.dep.handler not in CONSUMER_HANDLERS or module not in self.means:
                continue
            means = self.means[module]
            root = torch.as_tensor(list(item.root_idxs))
            total = torch.zeros(width).index_add_(0, root, means[torch.as_tensor(list(item.idxs))])
            count = torch.zeros(width).index_add_(0, root, torch.ones(len(root)))
            parts.append(total / count.clamp_min(1) / torch.quantile(means, self.quantile).clamp_min(1e-12))
        return torch.stack(parts).mean(dim=0) if parts else None


@register_importance("activation")
def activation_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean |input| to the next layers per channel over their 0.9-quantile, and the cut of mode threshold."""
    threshold = cfg.activation.threshold if cfg.activation.mode == "threshold" else None
    return ActivationImportance(prune_threshold=threshold)
