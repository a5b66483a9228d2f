"""Torch-Pruning's group magnitude criterion (`l1`, `l2`) with the same arithmetic and less work per layer."""

from __future__ import annotations

import torch
import torch_pruning as tp

from aip.config import PruneConfig
from aip.prune.criteria.registry import register_importance

_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def _power(w: torch.Tensor, p: int) -> torch.Tensor:
    """|w|^p; for p = 1 without Torch-Pruning's pass over the weights that raises to the first power (an identity)."""
    w = w.abs()
    return w if p == 1 else w.pow(p)


def _summed(w: torch.Tensor, p: int, keep: int) -> torch.Tensor:
    """Per index of dimension `keep`, the sum of |w|^p over the other dimensions; for p = 1 one reduction, with
    no transposed copy and no |w| tensor (the layer's weight is read once)."""
    dims = [d for d in range(w.dim()) if d != keep]
    if p == 1:
        return torch.linalg.vector_norm(w, 1, dim=dims)
    return _power(w, p).sum(dims)


class MagnitudeImportance(tp.importance.GroupMagnitudeImportance):
    """The mean over a group's conv, linear, BatchNorm and LayerNorm layers of each channel's summed |w|^p,
    normalised to mean 1: `GroupMagnitudeImportance(p, normalizer="mean")`, value for value, with no bias term."""

    def __init__(self, p: int) -> None:
        super().__init__(p=p, group_reduction="mean", normalizer="mean", bias=False)

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        scores, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)):
                continue
            transposed = getattr(layer, "transposed", False)
            if fn in _OUT:
                local = _summed(layer.weight.data, self.p, 1 if transposed else 0)[idxs]
            elif fn in _IN:
                local = _summed(layer.weight.data, self.p, 0 if transposed else 1)
                if fn == tp.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    local = local.repeat(layer.groups)
                local = local[idxs]
            elif fn == tp.prune_batchnorm_out_channels and layer.affine:
                local = _power(layer.weight.data[idxs], self.p)
            elif fn == tp.prune_layernorm_out_channels and layer.elementwise_affine:
                local = _power(layer.weight.data[idxs], self.p)
            else:
                continue
            scores.append(local)
            roots.append(group[i].root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, roots), self.normalizer)


@register_importance("l1")
def l1_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean L1 norm of each channel's weights over all coupled layers of the group."""
    return MagnitudeImportance(p=1)


@register_importance("l2")
def l2_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean L2 norm of each channel's weights over all coupled layers of the group."""
    return MagnitudeImportance(p=2)
