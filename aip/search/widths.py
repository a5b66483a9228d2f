"""ACP's width search under a session: the clustering start, then the particle swarm whose candidates every
process shares out and scores by a short recovery; the swarm is saved after every iteration and resumed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from accelerate.utils import broadcast_object_list
from torch import nn

from aip.prune.pruner import ChannelPruner, PruningError
from aip.prune.widths import WidthCost
from aip.search.acp import ParticleSwarm, cluster_channels, scale_to_budget
from aip.search.fitness import BUDGET_SLACK, SearchData, channel_responses, recovered, spread
from aip.session import Session

SWARM_FILE = "acp_swarm.json"


def search_widths(
    session: Session, teacher: nn.Module, pruner: ChannelPruner, budget: float, metric: str, data: SearchData
) -> tuple[dict[str, int], int]:
    """Best widths per group under `budget`, and how many candidates this process scored.

    Every process runs the same swarm: each scores its share of an iteration's candidates and all gather the
    scores, so the search takes 1/N of the time on N processes and no process idles in a collective."""
    acc, cfg, acp = session.accelerator, session.cfg, session.cfg.acp
    names = list(pruner.widths())
    upper = [pruner.original_widths[n] for n in names]
    lower = [pruner.min_width(n) for n in names]
    # every width on its group's grid (its channel unit, and prune.round_to): the widths priced are those cut
    grids = [pruner.grid(n) for n in names]
    width_cost = WidthCost(pruner)

    def cost(widths: list[int]) -> float:
        return width_cost.of(dict(zip(names, widths, strict=True)), metric)

    if cost(lower) > budget * (1 + BUDGET_SLACK):
        raise PruningError(
            f"acp cannot reach the budget: with every layer at its cap (prune.max_layer_ratio="
            f"{pruner.max_layer_ratio}) the {metric} are still {cost(lower) / budget:.3f} of it; raise the cap or the "
            "target ratio"
        )

    count, batch = acp.calibration_images, cfg.data.eval_batch_size
    roots, task = pruner.root_modules(), session.task
    responses = channel_responses(pruner.model, roots, data.calibration, count, batch, acc.device, task)
    start = []
    for i, (name, lo, hi) in enumerate(zip(names, lower, upper, strict=True)):
        width, _ = cluster_channels(responses[name], acp.eps, acp.min_samples)
        start.append(grids[i].nearest(min(hi, max(lo, width))))
    if acc.num_processes > 1:  # one starting point for every process's swarm, whatever its float rounding
        box = [start]
        broadcast_object_list(box)
        start = box[0]
    session.print(f"acp: clustering keeps {sum(start)}/{sum(upper)} channels, {metric} {cost(start) / cost(upper):.3f}")
    example = session.example.to(acc.device)
    evaluations = [0]

    def score(widths: list[int]) -> float:
        measured, cut = recovered(cfg, teacher, dict(zip(names, widths, strict=True)), example, data, task)
        excess = cost([cut[n] for n in names]) / budget - 1.0  # priced as cut: a failed removal keeps a group wider
        return measured / 100.0 - acp.swarm.penalty * max(0.0, excess)

    def evaluate_many(candidates: list[list[int]]) -> list[float]:
        scores, mine = spread(acc, score, candidates)
        evaluations[0] += mine
        return scores

    def report(state: Any) -> None:
        best = [int(w) for w in state.global_best]
        session.log({"acp/best_fitness": state.global_fitness}, state.iteration)
        session.print(
            f"acp iteration {state.iteration}/{acp.swarm.iterations}: best fitness {state.global_fitness:.4f}, "
            f"{metric} {cost(best) / cost(upper):.3f}, widths {best}"
        )

    search = {k: v for k, v in acp.__dict__.items() if k != "timeout_minutes"}  # what changes the result
    steps = [g.step for g in grids]  # keys as before for plain widths and for prune.round_to
    keyed = [cfg.model.name, cfg.seed, budget, search] + (
        [pruner.round_to] if pruner.round_to > 1 else [steps] if max(steps, default=1) > 1 else []
    )
    key = hashlib.sha256(json.dumps(keyed, default=str).encode())
    swarm = ParticleSwarm(
        lower,
        upper,
        None,
        lambda w: scale_to_budget(w, lower, cost, budget, grids, upper if acp.fill_budget else None),
        acp.swarm,
        seed=cfg.seed,
        state_path=session.run_dir / SWARM_FILE,
        key=key.hexdigest()[:16],
        evaluate_many=evaluate_many,
        write=session.main,
    )
    best = swarm.run(start, report)
    if cost(best) > budget * (1 + BUDGET_SLACK):  # every candidate is projected under the budget: a stale swarm file?
        raise PruningError(f"acp's best widths cost {cost(best) / budget:.4f} of the {metric} budget: {best}")
    return dict(zip(names, best, strict=True)), evaluations[0]
