"""Hardware-friendly widths: with `prune.round_to: N`, every pruned group keeps a width that is a multiple of N.

The rule: a group of original width W whose channels go in units of u (a grouped convolution or a chunked tensor
loses one channel of every piece at a time) may take the widths that are multiples of L = lcm(u, N), from the
smallest such multiple at or above its per-layer floor (and never below L) up to W, and W itself (left unpruned).
So a group narrower than L, or one whose floor rounds up to W, stays whole; a group whose W is no multiple of N drops
to the largest multiple below W on its first removal, and by L channels at a time after that. Without rounding
(N = 1) the allowed widths are the multiples of u, as Torch-Pruning's own pruners keep them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WidthGrid:
    """The widths one group may take: multiples of `step` from `low` to below `original`, and `original`."""

    original: int
    step: int
    low: int

    @classmethod
    def make(cls, original: int, unit: int, round_to: int, floor: int) -> WidthGrid:
        """The grid of a group of `original` channels in units of `unit`, kept at or above `floor` channels."""
        step = math.lcm(max(1, unit), max(1, round_to))
        low = max(step, math.ceil(floor / step) * step)
        return cls(original, step, min(low, original))

    def below(self, width: int) -> list[int]:
        """Every allowed width under `width`, largest first."""
        top = (width - 1) // self.step * self.step
        return list(range(top, self.low - 1, -self.step)) if self.low < self.original else []

    def floor(self, width: float) -> int:
        """The largest allowed width at or under `width` (`low` when `width` is under every allowed width)."""
        if width >= self.original or self.low >= self.original:
            return self.original
        return max(self.low, math.floor(width / self.step + 1e-9) * self.step)

    def nearest(self, width: float) -> int:
        """The allowed width closest to `width` (the larger one on a tie)."""
        down = self.floor(width)
        if down == self.original:
            return down
        up = min(self.original, down + self.step)
        return up if up - width <= width - down else down


def blocks(width: int, unit: int, grid: WidthGrid) -> list[int]:
    """How many units each successive removal takes from a group now `width` wide, down to the grid's lowest width."""
    sizes, at = [], width
    for allowed in grid.below(width):
        sizes.append((at - allowed) // unit)
        at = allowed
    return sizes
