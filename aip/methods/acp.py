"""`mode: acp`: cluster channels and search per-group widths with a particle swarm under the final budget, then
prune towards those widths over the same intervals as `mode: aip` (each stage cuts to widths on the way from the
teacher's to the searched ones, at that interval's cost target) and recover every stage (AIP losses or plain
fine-tuning)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from aip.config import ATLoss, KDLoss, LossConfig, WeightedLoss
from aip.errors import ConfigError
from aip.methods.processes import check_same_architecture
from aip.methods.pruning import PruningRun, plan_stages, start_pruning, target_ratio
from aip.methods.recovery import Stage, end_stage
from aip.prune.pruner import ChannelPruner
from aip.prune.schedule import interval_targets
from aip.search.fitness import SearchData, cut_to_widths, split_search_data
from aip.search.widths import search_widths
from aip.session import Outcome, Session

BISECTION_STEPS = 40  # on the fraction of the way from the teacher's widths to the searched ones


def search_data(session: Session) -> SearchData:
    """The training set split for the search and the cuts, refused when too little is left to train on."""
    cfg = session.cfg
    data = split_search_data(session.data, cfg.acp.holdout_size, cfg.seed, session.task)
    if len(data.train) < cfg.data.batch_size:  # the candidates' recovery would draw no batch
        raise ConfigError(
            f"acp.holdout_size: {cfg.acp.holdout_size} leaves {len(data.train)} training images, fewer than "
            f"data.batch_size={cfg.data.batch_size}; hold out fewer images"
        )
    return data


def searched_widths(run: PruningRun, data: SearchData) -> tuple[dict[str, int], dict]:
    """The final widths: searched once on the teacher (every process scores its share of the candidates, rank 0's
    result decides) and kept in the run state, so a run resumed at a later stage cuts towards the same widths."""
    session = run.session
    if session.state.searched_widths:
        return dict(session.state.searched_widths), {}
    started = time.perf_counter()
    budget = run.base[run.metric] * target_ratio(session.cfg)
    widths, evaluations = search_widths(session, run.teacher, run.pruner, budget, run.metric, data)
    box = [widths]
    if session.accelerator.num_processes > 1:
        broadcast_object_list(box)
    session.state.searched_widths = dict(box[0])
    acc = session.accelerator
    counts = acc.gather(torch.tensor([evaluations], device=acc.device)).tolist()
    return dict(box[0]), {"search_seconds": time.perf_counter() - started, "evaluations_per_process": counts}


def widths_at(pruner: ChannelPruner, final: dict[str, int], budget: float, metric: str) -> dict[str, int]:
    """The widths a fraction `a` of the way from the teacher's to `final` (each on its group's grid, never under
    `final`), with the smallest `a` whose cost is within `budget`: every group narrows in proportion to the cut the
    search gave it, so the last interval's widths are the searched ones."""
    start = {n: pruner.original_widths[n] for n in final}

    def at(a: float) -> dict[str, int]:
        return {n: max(final[n], pruner.grid(n).floor(start[n] - a * (start[n] - final[n]))) for n in final}

    table = pruner.width_cost()
    if table.of(at(1.0), metric) > budget:
        return at(1.0)  # the searched widths themselves; the cut's budget check names what is over
    low, high = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (low, mid) if table.of(at(mid), metric) <= budget else (mid, high)
    return at(high)


def acp_prune(run: PruningRun, stage: Stage, data: SearchData) -> None:
    """Cut the student to the stage's widths on the way to the searched ones (the search runs before the first cut),
    and log it. The intervals' cost targets follow `prune.schedule` down to the searched widths' cost (at most the
    budget: with `acp.fill_budget` the search widens every candidate until no group's next width fits)."""
    session, pruner, cfg = run.session, run.pruner, run.session.cfg
    final, search = searched_widths(run, data)
    started = time.perf_counter()
    searched = min(pruner.width_cost().of(final, run.metric) / run.base[run.metric], target_ratio(cfg))
    last = stage.interval == cfg.prune.intervals
    target = interval_targets(searched, cfg.prune.intervals, cfg.prune.schedule)[stage.interval - 1]
    budget = run.base[run.metric] * (target_ratio(cfg) if last else target)
    goal = final if last else widths_at(pruner, final, budget, run.metric)
    acc = session.accelerator
    before = pruner.cost(run.metric) / run.base[run.metric]
    cut_to_widths(
        pruner,
        goal,
        cfg.prune,
        data.calibration,
        cfg.data.batch_size,
        acc.device,
        session.task,
        budget,
        run.metric,
        cfg.acp.criterion,
    )
    entry = {
        "stage": stage.index,
        "criterion": "acp",
        "metric": run.metric,
        "ratio_before": before,
        "ratio_after": pruner.cost(run.metric) / run.base[run.metric],
        "target_ratio": budget / run.base[run.metric],
        **search,
        "seconds": time.perf_counter() - started,
        "widths": pruner.widths(),
        "searched_widths": final,
        "round_to": pruner.round_to,
        "architecture_per_process": check_same_architecture(session, pruner.model, stage.index),
    }
    session.state.pruning_log.append(entry)
    session.print(
        f"stage {stage.index}: cut (acp) {run.metric} {before:.3f} -> {entry['ratio_after']:.3f} of the teacher "
        f"(target {entry['target_ratio']:.3f})"
    )


def run_acp(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """`mode: acp`: search the widths, then prune towards them interval by interval, recovering each stage; report
    and export. A resumed run goes on as `run_aip` does: the architecture is replayed from the checkpoint's history,
    the searched widths come from its run state, the weights and states through Accelerate."""
    if branch is not None:
        raise ConfigError("--from-stage branches an AIP run; mode acp searches its structure from the teacher")
    run = start_pruning(session, resume)
    stages = plan_stages(session.cfg, kind="acp")
    plain = LossConfig(ce=WeightedLoss(1.0), kd=KDLoss(weight=0.0), at=ATLoss(weight=0.0), adv=WeightedLoss(0.0))
    losses = plain if session.cfg.acp.final == "finetune" else None
    run.begin(stages)
    data = None
    for stage in stages:
        if stage.index <= session.state.stage:
            continue
        session.seed(stage.index, -1)
        run.student = session.accelerator.unwrap_model(run.student)
        if stage.target is not None and not run.resuming_in(stage):
            data = data or search_data(session)
            acp_prune(run, stage, data)
        prepared = run.recover(stage, losses=losses)
        end_stage(session, stage, prepared, run.val, run.base, run.pruner)
    return run.finish()
