"""How much of the original cost each pruning interval keeps, so that the last interval meets the target."""

from __future__ import annotations


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
