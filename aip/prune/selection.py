"""Which channels one removal step takes: each group's lowest-scored units in blocks that keep its width on its
grid (see `rounding`), ranked across groups, taken until their exact cost fills the gap to the target."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple, Protocol

import torch

from aip.prune.rounding import WidthGrid, blocks


class Candidate(NamedTuple):
    """One block of units of a group that may go together: their mean and highest score, their indices."""

    score: float
    name: str
    block: int
    units: tuple[int, ...]
    top: float


class Pricer(Protocol):
    def peek(self, name: str, channels: int) -> float: ...

    def take(self, name: str, channels: int) -> None: ...


def group_candidates(name: str, scores: torch.Tensor, width: int, unit: int, grid: WidthGrid) -> list[Candidate]:
    """The blocks of group `name` (unit scores `scores`, now `width` channels wide) in the order they would go."""
    ranked = torch.argsort(scores, stable=True)
    order, values = ranked.tolist(), scores[ranked].double().tolist()
    found, at = [], 0
    for i, size in enumerate(blocks(width, unit, grid)):
        block = values[at : at + size]
        found.append(Candidate(math.fsum(block) / size, name, i, tuple(order[at : at + size]), block[-1]))
        at += size
    return found


def rank(candidates: list[Candidate], order: dict[str, float] | None = None) -> list[Candidate]:
    """Lowest score first; with a hierarchical `order`, the lowest-ordered group first, by score within it."""
    if order:
        return sorted(candidates, key=lambda c: (order.get(c.name, float("inf")), c.name, c.score, c.block))
    return sorted(candidates, key=lambda c: (c.score, c.name, c.block))


def per_price(candidates: list[Candidate], pricer: Pricer, units: dict[str, int]) -> list[Candidate]:
    """Lowest score per unit of cost saved first (a measured target: the cost is time, which no score knows); each
    group's blocks keep their order. A group whose removal saves nothing goes last."""
    price = {name: pricer.peek(name, units[name]) / units[name] for name in {c.name for c in candidates}}
    return sorted(
        candidates, key=lambda c: (c.score / price[c.name] if price[c.name] > 0 else math.inf, c.name, c.block)
    )


def choose(
    candidates: list[Candidate],
    pricer: Pricer,
    units: dict[str, int],
    gap: float,
    slack: float,
    close: bool = True,
) -> dict[str, list[int]]:
    """Take the ranked blocks whose cost fills `gap`, skipping one that would overshoot by more than `slack` (and
    the later blocks of its group, which keep the grid only behind it); with `close`, when the rest cannot fill the
    gap, the cheapest skipped block closes it (so one step reaches the target); when every block overshoots, the
    cheapest first block alone. `units` gives each group's channels per unit."""
    chosen: dict[str, list[int]] = defaultdict(list)
    removed, passed = 0.0, {}
    for c in candidates:
        if removed >= gap:
            break
        if c.name in passed:
            continue
        channels = len(c.units) * units[c.name]
        saves = pricer.peek(c.name, channels)
        if removed + saves > gap + slack:
            passed[c.name] = c
            continue
        pricer.take(c.name, channels)
        chosen[c.name].extend(c.units)
        removed += saves
    left = [c for c in candidates if c.block == 0] if not chosen else list(passed.values()) if close else []
    if removed < gap and left:
        best = min(left, key=lambda c: (pricer.peek(c.name, len(c.units) * units[c.name]), c.score))
        pricer.take(best.name, len(best.units) * units[best.name])
        chosen[best.name].extend(best.units)
    return dict(chosen)
