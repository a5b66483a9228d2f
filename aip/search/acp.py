"""ACP: automatic channel pruning by clustering feature maps, then a particle-swarm search of per-group widths.

1. Clustering: per prunable group, the root layer's channels are described by their responses on calibration
   images (spatial means, one value per image) and clustered with DBSCAN on correlation distance; the group keeps
   (clusters + noise points) channels. `eps` is the compression knob.
2. Particle swarm over width vectors (one width per group: coupled layers share it): particle 0 is the clustering
   result, the others random offsets of it; every candidate is projected under the FLOPs (or parameter) budget and,
   with `acp.fill_budget`, widened back up to it (a common share, then one width step at a time).
   Fitness comes from the caller (accuracy after a short recovery on a held-out split), minus a penalty for any
   excess over the budget; a caller may score a whole iteration's candidates at once (`evaluate_many`), sharing
   them out over processes. The swarm's state is saved after every iteration and a search resumes from it.

The swarm knows nothing of training: `aip.search.widths` passes the fitness function.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aip.config import SwarmConfig
from aip.prune.rounding import WidthGrid


def dbscan(dist: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN labels (-1: noise) from a square distance matrix; neighbourhoods include the point itself."""
    n = dist.shape[0]
    near = dist <= eps
    core = near.sum(dim=1) >= min_samples
    labels = torch.full((n,), -1, dtype=torch.long)
    cluster = 0
    for seed in range(n):
        if not core[seed] or labels[seed] >= 0:
            continue
        labels[seed] = cluster
        frontier = [seed]
        while frontier:
            point = frontier.pop()
            if not core[point]:
                continue  # border point: in the cluster, but does not extend it
            for other in near[point].nonzero().flatten().tolist():
                if labels[other] < 0:
                    labels[other] = cluster
                    frontier.append(other)
        cluster += 1
    return labels


def cluster_channels(responses: torch.Tensor, eps: float, min_samples: int) -> tuple[int, torch.Tensor]:
    """(width to keep, labels) for channels described by `responses` (channels, samples): clusters + noise.

    Channels are compared by the cosine distance of their centred responses (1 - Pearson correlation), so two
    channels that rise and fall together over the images count as one, whatever their scale.
    """
    unit = responses.float() - responses.float().mean(dim=1, keepdim=True)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = dbscan((1.0 - unit @ unit.T).clamp_min(0.0), eps, min_samples)
    clusters = int(labels.max().item()) + 1 if (labels >= 0).any() else 0
    return clusters + int((labels < 0).sum()), labels


@dataclass
class SwarmState:
    """Everything the swarm needs to continue: saved as JSON after every iteration."""

    iteration: int = 0
    positions: list[list[float]] = field(default_factory=list)
    velocities: list[list[float]] = field(default_factory=list)
    best_positions: list[list[float]] = field(default_factory=list)
    best_fitness: list[float] = field(default_factory=list)
    global_best: list[float] = field(default_factory=list)
    global_fitness: float = -math.inf
    rng: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    key: str = ""


class ParticleSwarm:
    """Particle-swarm optimisation of integer width vectors between `lower` and `upper`, maximising `fitness`.

    `project(widths)` maps any vector to an admissible one (inside the budget); `fitness(widths)` scores a projected
    integer vector, or `evaluate_many(vectors)` scores all of an iteration's at once (the same values, in order).
    Velocities follow the constriction form v <- chi (w v + c1 r1 (p - x) + c2 r2 (g - x)), the inertia w falling
    linearly over the iterations, each component clipped to +-velocity_clip. Every process of a multi-process search
    runs the same swarm on the same scores; only the one with `write=True` saves its state.
    """

    def __init__(
        self,
        lower: list[int],
        upper: list[int],
        fitness: Callable[[list[int]], float] | None,
        project: Callable[[list[float]], list[int]],
        cfg: SwarmConfig,
        seed: int = 0,
        state_path: Path | None = None,
        key: str = "",
        evaluate_many: Callable[[list[list[int]]], list[float]] | None = None,
        write: bool = True,
    ) -> None:
        if fitness is None and evaluate_many is None:
            raise ValueError("ParticleSwarm needs fitness or evaluate_many")
        self.lower = torch.tensor(lower, dtype=torch.float64)
        self.upper = torch.tensor(upper, dtype=torch.float64)
        self.fitness, self.project, self.cfg = fitness, project, cfg
        self.evaluate_many = evaluate_many
        self.state_path, self.key, self.write = state_path, key, write
        self.gen = torch.Generator().manual_seed(seed)
        self.state = SwarmState(key=key)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64)

    def _evaluate(self, positions: torch.Tensor) -> tuple[list[list[int]], list[float]]:
        """Project every position and score the projected vectors, all at once when the caller can."""
        widths = [self.project(p.tolist()) for p in positions]
        if self.evaluate_many is not None:
            return widths, [float(f) for f in self.evaluate_many(widths)]
        return widths, [float(self.fitness(w)) for w in widths]  # type: ignore[misc]

    def initialise(self, start: list[int]) -> None:
        """Particle 0 at `start`, the others offset from it by up to init_spread of each group's range."""
        n, dims = self.cfg.particles, len(start)
        base = torch.tensor(start, dtype=torch.float64)
        spread = self.cfg.init_spread * (self.upper - self.lower)
        positions = base + (2 * self._rand(n, dims) - 1) * spread
        positions[0] = base
        positions = torch.maximum(torch.minimum(positions, self.upper), self.lower)
        self.state.positions = positions.tolist()
        widths, fits = self._evaluate(positions)
        self.state.best_positions = [[float(w) for w in ws] for ws in widths]
        self.state.best_fitness = fits
        self.state.velocities = torch.zeros(n, dims).tolist()
        best = max(range(n), key=lambda i: self.state.best_fitness[i])
        self.state.global_best = list(self.state.best_positions[best])
        self.state.global_fitness = self.state.best_fitness[best]
        self._record()

    def step(self) -> None:
        """One PSO iteration over all particles, then a checkpoint of the swarm."""
        c, s = self.cfg, self.state
        it = s.iteration
        inertia = c.inertia_start + (c.inertia_end - c.inertia_start) * it / max(1, c.iterations - 1)
        x = torch.tensor(s.positions, dtype=torch.float64)
        v = torch.tensor(s.velocities, dtype=torch.float64)
        p = torch.tensor(s.best_positions, dtype=torch.float64)
        g = torch.tensor(s.global_best, dtype=torch.float64)
        r1, r2 = self._rand(*x.shape), self._rand(*x.shape)
        v = c.constriction * (inertia * v + c.c1 * r1 * (p - x) + c.c2 * r2 * (g - x))
        v = v.clamp(-c.velocity_clip, c.velocity_clip)
        moved = x + v
        x = torch.maximum(torch.minimum(moved, self.upper), self.lower)
        v = torch.where(moved == x, v, -0.5 * v)  # reflecting walls: a particle at a bound turns back
        everyone, fits = self._evaluate(x)  # positions stay continuous; a particle is scored at its projected point
        for i, (widths, fit) in enumerate(zip(everyone, fits, strict=True)):
            if fit > s.best_fitness[i]:
                s.best_fitness[i], s.best_positions[i] = fit, [float(w) for w in widths]
            if fit > s.global_fitness:
                s.global_fitness, s.global_best = fit, [float(w) for w in widths]
        s.positions, s.velocities = x.tolist(), v.tolist()
        s.iteration += 1
        self._record()

    def _record(self) -> None:
        self.state.history.append({"iteration": self.state.iteration, "best_fitness": self.state.global_fitness})
        self.save()

    def save(self) -> None:
        if self.state_path is None or not self.write:
            return
        self.state.rng = self.gen.get_state().tolist()
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state.__dict__))
        os.replace(tmp, self.state_path)

    def load(self) -> bool:
        """Continue from the saved swarm, if there is one for the same search (same key); True when loaded."""
        if self.state_path is None or not self.state_path.is_file():
            return False
        try:
            data = json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            return False
        if data.get("key") != self.key:
            return False
        self.state = SwarmState(**data)
        self.gen.set_state(torch.tensor(self.state.rng, dtype=torch.uint8))
        return True

    def run(self, start: list[int], on_iteration: Callable[[SwarmState], None] | None = None) -> list[int]:
        """Search from `start` (or from the saved swarm) and return the best width vector found."""
        if not self.load():
            self.initialise(start)
            if on_iteration:
                on_iteration(self.state)
        while self.state.iteration < self.cfg.iterations:
            self.step()
            if on_iteration:
                on_iteration(self.state)
        return [int(w) for w in self.state.global_best]


def scale_to_budget(
    widths: list[float],
    lower: list[int],
    cost: Callable[[list[int]], float],
    budget: float,
    grids: list[WidthGrid] | None = None,
    upper: list[int] | None = None,
) -> list[int]:
    """Round `widths`; if their cost exceeds `budget`, shrink every group towards `lower` by one common factor
    (bisection) until it fits. Returns `lower` when even that is over budget (the caller's penalty applies). With
    `grids` (one per group, `lower` on them), each width is rounded to its grid's nearest width and shrunk to its
    grid's widths (`prune.round_to`). With `upper`, widths under the budget (as given or as shrunk) grow towards
    `upper` until no group's next width fits (`_grow`), so every candidate spends the budget it is given."""
    if grids is None:
        rounded = [max(lo, round(w)) for w, lo in zip(widths, lower, strict=True)]
    else:
        rounded = [max(lo, g.nearest(w)) for w, lo, g in zip(widths, lower, grids, strict=True)]
    if cost(rounded) <= budget:
        return rounded if upper is None else _grow(rounded, upper, cost, budget, grids)

    def shrink(f: float) -> list[int]:
        if grids is not None:
            return [max(lo, g.floor(lo + f * (w - lo))) for w, lo, g in zip(rounded, lower, grids, strict=True)]
        return [max(lo, math.floor(lo + f * (w - lo))) for w, lo in zip(rounded, lower, strict=True)]

    if cost(shrink(0.0)) > budget:
        return shrink(0.0)
    shrunk = shrink(_largest_fitting(lambda f: cost(shrink(f)) <= budget))
    return shrunk if upper is None else _grow(shrunk, upper, cost, budget, grids)


def _grow(
    widths: list[int],
    upper: list[int],
    cost: Callable[[list[int]], float],
    budget: float,
    grids: list[WidthGrid] | None,
) -> list[int]:
    """`widths` (within `budget`) moved towards `upper` by the largest common factor that stays within it, then
    topped up one width step at a time, the group grown least (as a share of its room) first, while a step fits."""

    def grow(f: float) -> list[int]:
        if grids is not None:
            return [min(up, max(w, g.floor(w + f * (up - w)))) for w, up, g in zip(widths, upper, grids, strict=True)]
        return [min(up, max(w, math.floor(w + f * (up - w)))) for w, up in zip(widths, upper, strict=True)]

    def step_up(i: int, width: int) -> int:
        return min(upper[i], grids[i].floor(width + grids[i].step) if grids is not None else width + 1)

    grown = grow(_largest_fitting(lambda f: cost(grow(f)) <= budget))
    while True:
        share = [(g - w) / (up - w) if up > w else 1.0 for g, w, up in zip(grown, widths, upper, strict=True)]
        for i in sorted(range(len(grown)), key=lambda i: (share[i], i)):
            trial = list(grown)
            trial[i] = step_up(i, grown[i])
            if trial[i] > grown[i] and cost(trial) <= budget:
                grown = trial
                break
        else:
            return grown


def _largest_fitting(fits: Callable[[float], bool], steps: int = 40) -> float:
    """The largest factor in [0, 1] (to 2**-steps) for which `fits` holds, given that it holds at 0 and is monotone."""
    low, high = 0.0, 1.0
    if fits(1.0):
        return 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
