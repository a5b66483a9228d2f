"""He et al. 2019's geometric-median criterion (`fpgm`): the filters most replaceable by the others of their layer
go first (a likeness criterion, like `similarity`; weights only)."""

from __future__ import annotations

import torch_pruning as tp

from aip.config import PruneConfig
from aip.prune.criteria.registry import register_importance


@register_importance("fpgm")
def fpgm_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Filters closest to the geometric median of their layer go first (He et al. 2019, weights only)."""
    return tp.importance.FPGMImportance(normalizer="mean")
