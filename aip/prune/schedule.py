"""How much of the original cost each pruning interval keeps, so that the last interval meets the target, and which
criterion each interval ranks channels by (`hybrid`: a schedule of two criteria)."""

from __future__ import annotations

import torch_pruning as tp

from aip.config import PruneConfig
from aip.prune.criteria.registry import register_importance


def interval_targets(target_ratio: float, intervals: int, kind: str = "geometric") -> list[float]:
    """Cost ratios (to the original) to reach after intervals 1..S.

    `geometric` removes the same fraction of what is left each time (gentler on late, thin networks);
    `linear` removes the same share of the original each time.
    """
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"target ratio must lie in (0, 1), got {target_ratio}")
    if intervals < 1:
        raise ValueError(f"intervals must be >= 1, got {intervals}")
    steps = range(1, intervals + 1)
    if kind == "geometric":
        return [target_ratio ** (s / intervals) for s in steps]
    if kind == "linear":
        return [1.0 - (1.0 - target_ratio) * s / intervals for s in steps]
    raise ValueError(f"unknown schedule {kind!r}; known: geometric, linear")


def criterion_for_interval(cfg: PruneConfig, interval: int, reached: float) -> str:
    """The criterion that interval `interval` (1-based) uses; `reached` is the fraction of the total reduction done.

    For `hybrid`: the saliency criterion until the switch (an interval index, or a fraction of the reduction
    reached), the similarity criterion from then on. Any other criterion applies to every interval.
    """
    if cfg.criterion != "hybrid":
        return cfg.criterion
    h = cfg.hybrid
    late = interval >= h.switch_interval if h.switch_interval is not None else reached >= h.switch_fraction - 1e-9
    return h.similarity if late else h.saliency


@register_importance("hybrid")
def hybrid_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Placeholder entry so `hybrid` is a known name; the AIP method asks `criterion_for_interval` which applies."""
    raise TypeError("hybrid is a schedule of criteria: call criterion_for_interval() and create that one")
