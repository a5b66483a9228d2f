"""`mode: acp`: cluster channels, search per-group widths with a particle swarm under the budget, cut the student
to the best widths with Torch-Pruning, and recover it (AIP losses or plain fine-tuning) as one stage."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from aip.config import ATLoss, KDLoss, LossConfig, WeightedLoss
from aip.errors import ConfigError
from aip.methods.processes import check_same_architecture
from aip.methods.pruning import start_pruning, target_ratio
from aip.methods.recovery import Stage, end_stage
from aip.prune.pruner import ChannelPruner
from aip.search.fitness import cut_to_widths, split_search_data
from aip.search.widths import search_widths
from aip.session import Outcome, Session


def acp_prune(session: Session, teacher: nn.Module, pruner: ChannelPruner, base: dict[str, int], metric: str) -> None:
    """Search the widths (every process scores its share of the candidates), cut the student to them, log it."""
    acc, cfg = session.accelerator, session.cfg
    started = time.perf_counter()
    data = split_search_data(session.data, cfg.acp.holdout_size, cfg.seed, session.task)
    if len(data.train) < cfg.data.batch_size:  # the candidates' recovery would draw no batch
        raise ConfigError(
            f"acp.holdout_size: {cfg.acp.holdout_size} leaves {len(data.train)} training images, fewer than "
            f"data.batch_size={cfg.data.batch_size}; hold out fewer images"
        )
    widths, evaluations = search_widths(session, teacher, pruner, base[metric] * target_ratio(cfg), metric, data)
    box = [widths]
    if acc.num_processes > 1:  # every process ran the same swarm on the same scores; rank 0's result decides
        broadcast_object_list(box)
    budget = base[metric] * target_ratio(cfg)  # a removal refused in the cut must not leave it over the budget
    cut_to_widths(
        pruner, box[0], cfg.prune, data.calibration, cfg.data.batch_size, acc.device, session.task, budget, metric
    )
    counts = acc.gather(torch.tensor([evaluations], device=acc.device)).tolist()
    session.state.pruning_log.append(
        {
            "stage": 1,
            "criterion": "acp",
            "metric": metric,
            "ratio_after": pruner.cost(metric) / base[metric],
            "target_ratio": target_ratio(cfg),
            "seconds": time.perf_counter() - started,
            "widths": pruner.widths(),
            "round_to": pruner.round_to,
            "evaluations_per_process": counts,
            "architecture_per_process": check_same_architecture(session, pruner.model, 1),
        }
    )


def run_acp(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """`mode: acp`: search, cut, recover as one stage; report and export. A resumed run goes on as `run_aip` does:
    the architecture is replayed from the checkpoint's history, the weights and states come back through Accelerate."""
    if branch is not None:
        raise ConfigError("--from-stage branches an AIP run; mode acp searches its structure from the teacher")
    run = start_pruning(session, resume)
    stage = Stage(1, "acp", session.cfg.prune.finetune_epochs, target_ratio(session.cfg))
    run.begin([stage])
    if session.state.stage < stage.index:
        if not run.resuming_in(stage):
            acp_prune(session, run.teacher, run.pruner, run.base, run.metric)
        plain = LossConfig(ce=WeightedLoss(1.0), kd=KDLoss(weight=0.0), at=ATLoss(weight=0.0), adv=WeightedLoss(0.0))
        prepared = run.recover(stage, losses=plain if session.cfg.acp.final == "finetune" else None)
        end_stage(session, stage, prepared, run.val, run.base, run.pruner)
    return run.finish()
