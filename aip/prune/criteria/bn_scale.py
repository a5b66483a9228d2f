"""Network slimming's criterion (`bn_scale`): the channels whose BatchNorm scale is smallest go first."""

from __future__ import annotations

import torch_pruning as tp

from aip.config import PruneConfig
from aip.prune.criteria.registry import register_importance


@register_importance("bn_scale")
def bn_scale_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """|gamma| of the BatchNorm layers that follow the channel (network slimming)."""
    return tp.importance.BNScaleImportance(normalizer="mean")
