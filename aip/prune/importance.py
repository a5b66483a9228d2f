"""Channel criteria as Torch-Pruning Importance objects, filed in a registry by their config name, and what the
pruner asks of one.

Importing this module registers every criterion (`aip.prune.criteria`) and the `hybrid` schedule's name
(`aip.prune.schedule`). Criteria whose calibration passes must run backward set `needs_gradients`; criteria that
record something on the calibration passes set `needs_features` and record it with `recording(model)` while the
caller runs calibration batches; a criterion that removes every channel under a fixed score at once sets
`prune_threshold`.
"""

from __future__ import annotations

import torch_pruning as tp

import aip.prune.criteria  # noqa: F401  (registers every criterion)
import aip.prune.schedule  # noqa: F401  (registers hybrid, a schedule of two criteria)
from aip.config import PruneConfig
from aip.prune.criteria.registry import IMPORTANCES, register_importance

__all__ = [
    "IMPORTANCES",
    "register_importance",
    "create_importance",
    "needs_gradients",
    "needs_features",
    "prune_threshold",
]


def needs_gradients(importance: tp.importance.Importance) -> bool:
    """True when the calibration passes must run backward (the criterion reads gradients)."""
    return bool(getattr(importance, "needs_gradients", False))


def needs_features(importance: tp.importance.Importance) -> bool:
    """True when the criterion records on calibration batches: wrap them in `importance.recording(model)`."""
    return bool(getattr(importance, "needs_features", False))


def prune_threshold(importance: tp.importance.Importance) -> float | None:
    """The score under which every channel goes at once (`activation` in mode threshold); None: prune to a target."""
    return getattr(importance, "prune_threshold", None)


def create_importance(name: str, cfg: PruneConfig | None = None) -> tp.importance.Importance:
    """The criterion registered as `name`, configured from the `prune` section."""
    return IMPORTANCES.get(name)(cfg if cfg is not None else PruneConfig())
