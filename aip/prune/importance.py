"""Channel criteria as Torch-Pruning Importance objects, filed in a registry by their config name.

Each entry is a factory returning a `tp.importance.Importance`: called on a dependency group, it gives one score per
channel of the group's root (higher = keep). Scores are normalised per group (mean 1) so that a global ranking across
groups compares like with like. Criteria that read gradients set `needs_gradients`, and the caller fills `.grad` from
calibration batches before scoring.
"""

from __future__ import annotations

import torch_pruning as tp

from aip.registry import Registry

IMPORTANCES = Registry("criterion")
register_importance = IMPORTANCES.register


def needs_gradients(importance: tp.importance.Importance) -> bool:
    """True when the criterion reads `.grad` of the weights (the caller must run calibration backward passes)."""
    return bool(getattr(importance, "needs_gradients", False))


@register_importance("l1")
def l1_importance() -> tp.importance.Importance:
    """Mean L1 norm of each channel's weights over all coupled layers of the group."""
    return tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean")


@register_importance("l2")
def l2_importance() -> tp.importance.Importance:
    """Mean L2 norm of each channel's weights over all coupled layers of the group."""
    return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")


@register_importance("bn_scale")
def bn_scale_importance() -> tp.importance.Importance:
    """|gamma| of the BatchNorm layers that follow the channel (network slimming)."""
    return tp.importance.BNScaleImportance(normalizer="mean")


class _TaylorImportance(tp.importance.GroupTaylorImportance):
    needs_gradients = True


@register_importance("taylor")
def taylor_importance() -> tp.importance.Importance:
    """First-order Taylor estimate |w * dL/dw| of the loss change when a channel goes (Molchanov et al. 2019)."""
    return _TaylorImportance(normalizer="mean")


def create_importance(name: str) -> tp.importance.Importance:
    """The criterion registered as `name`."""
    return IMPORTANCES.get(name)()
