"""Molchanov et al. 2019's first-order Taylor criterion (`taylor`): the channels whose removal changes the loss
least, estimated per calibration batch, go first.

It sets both `needs_gradients` and `needs_features`: it records per-batch gradients through parameter hooks, so it
reads no `.grad` and needs no call between batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from aip.config import PruneConfig
from aip.prune.criteria.pooling import IN_HANDLERS, OUT_HANDLERS, Gather, gather_all
from aip.prune.criteria.registry import register_importance

_TAYLOR_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _per_channel(module: nn.Module, name: str, wg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums of the products w * g of one parameter per output channel ("out") and, for weights, per input ("in")."""
    if name != "weight" or wg.dim() == 1:
        return {"out": wg}
    groups = getattr(module, "groups", 1)
    if getattr(module, "transposed", False):  # (in, out / groups, *kernel)
        return {
            "out": wg.reshape(groups, wg.shape[0] // groups, wg.shape[1], -1).sum(dim=(1, 3)).flatten(),
            "in": wg.flatten(1).sum(dim=1),
        }
    return {
        "out": wg.flatten(1).sum(dim=1),
        "in": wg.reshape(groups, wg.shape[0] // groups, wg.shape[1], -1).sum(dim=(1, 3)).flatten(),
    }


class TaylorImportance(tp.importance.Importance):
    """Molchanov et al. 2019's first-order Taylor criterion: per calibration batch, the square of the summed w * g
    over all parameters a channel takes with it (its filters and biases, the BatchNorm scale and shift, the consumers'
    input weights), averaged over the batches.

    Per batch, not on accumulated gradients: a channel whose gradients cancel across batches (here +3, there -3)
    still changes the loss on each of them and scores high; summing |w * g| over accumulated gradients would call it
    dead. The batches are recorded by gradient hooks on the parameters inside `recording(model)`, so the caller only
    runs its calibration forward and backward passes inside it. Every process's batches count, as if one process had
    run them all (see `gather_over_processes`). Scores are normalised per group (mean 1).
    """

    needs_gradients = True
    needs_features = True

    def __init__(self, gather: Gather | None = None) -> None:
        self.gather = gather
        self.per_batch: dict[tuple[nn.Module, str], torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Record, for every backward pass while open, each layer's per-channel sums of w * g (one row per pass)."""
        self.per_batch = {}
        rows: dict[tuple[nn.Module, str], dict[int, torch.Tensor]] = {}
        batch = [-1]

        def next_batch(_module: nn.Module, _inputs: object) -> None:
            batch[0] += 1

        def hook(module: nn.Module, name: str, param: nn.Parameter) -> Callable[[torch.Tensor], None]:
            def keep(grad: torch.Tensor) -> None:
                wg = param.detach().float() * grad.detach().float()
                for axis, sums in _per_channel(module, name, wg).items():
                    row = rows.setdefault((module, axis), {})
                    step = max(batch[0], 0)
                    row[step] = row[step] + sums if step in row else sums

            return keep

        handles = [model.register_forward_pre_hook(next_batch)]
        for module in model.modules():
            if isinstance(module, _TAYLOR_LAYERS):
                for name, param in module.named_parameters(recurse=False):
                    if name in ("weight", "bias") and param.requires_grad:
                        handles.append(param.register_hook(hook(module, name, param)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        n = batch[0] + 1
        order = {m: i for i, m in enumerate(model.modules())}
        stats = {}
        for key in sorted(rows, key=lambda k: (order[k[0]], k[1])):  # the same order on every process
            by_batch = rows[key]
            some = next(iter(by_batch.values()))
            stats[key] = torch.stack([by_batch.get(i, torch.zeros_like(some)) for i in range(max(n, len(by_batch)))])
        self.per_batch = {key: every.flatten(0, 1) for key, every in gather_all(stats, self.gather).items()}

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        width = len(group[0].idxs)
        z = None
        for item in group:
            handler = item.dep.handler
            axis = "out" if handler in OUT_HANDLERS else "in" if handler in IN_HANDLERS else None
            rows = self.per_batch.get((item.dep.target.module, axis))
            if rows is None:
                continue
            z = torch.zeros(rows.shape[0], width) if z is None else z
            z.index_add_(1, torch.as_tensor(list(item.root_idxs)), rows[:, torch.as_tensor(list(item.idxs))])
        if z is None:
            return None
        scores = (z**2).mean(dim=0)
        return scores / scores.mean().clamp_min(1e-12)


@register_importance("taylor")
def taylor_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Per-batch (sum of w * dL/dw over a channel's parameters)^2, averaged (Molchanov et al. 2019)."""
    return TaylorImportance()
