"""`mode: acp`: cluster channels, search per-group widths with a particle swarm under the budget, cut the student
to the best widths with Torch-Pruning, and recover it (AIP losses or plain fine-tuning) as one stage."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from aip import checkpoint as ckpt
from aip.config import KDLoss, LossConfig, WeightedLoss
from aip.errors import ConfigError
from aip.methods.aip import check_round_to, round_to, target_ratio
from aip.methods.recovery import (
    Stage,
    check_same_architecture,
    check_taps,
    discriminator,
    end_stage,
    recover,
    restore_stage,
    tap_names,
)
from aip.methods.train import load_teacher
from aip.prune.pruner import ChannelPruner
from aip.prune.restore import restore_pruned
from aip.search.fitness import cut_to_widths, split_search_data
from aip.search.widths import search_widths
from aip.session import Outcome, RunState, Session


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


def run_acp(session: Session, resume: Path | None = None) -> Outcome:
    """`mode: acp`: search, cut, recover; report and export.

    A resumed run goes on as `run_aip` does: the architecture is replayed from the checkpoint's history, and the
    weights, optimizer and RNG states come back from its stage-end or mid-stage checkpoint."""
    acc, cfg = session.accelerator, session.cfg
    check_taps(session)
    check_round_to(session)
    teacher = load_teacher(session, resume.parent.parent if resume is not None else None)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    taps = tap_names(session, student)
    disc = discriminator(session, taps)
    history, meta = ckpt.read(resume) if resume is not None else ([], {})
    prunable, example, ignored = session.task.prunable(student, session.example.to(acc.device))
    grid = round_to(session, meta.get("state"))
    pruner = ChannelPruner(prunable, example, ignored, cfg.prune.max_layer_ratio, grid)
    base = session.cost(student)
    metric = "flops" if cfg.prune.target_flops_ratio is not None else "params"
    val = acc.prepare_data_loader(session.val_loader())
    stage = Stage(1, "acp", cfg.prune.finetune_epochs, target_ratio(cfg))
    partial = None
    if resume is not None:
        restore_pruned(pruner, student, history)  # the weights come back through Accelerate (restore_stage, recover)
        session.state = RunState.restored(meta["state"], round_to=session.state.round_to)
        partial = meta.get("partial")
        session.print(f"resumed from {resume} after stage {session.state.stage}")
    ended = resume if resume is not None and partial is None and session.state.stage >= stage.index else None
    if not session.state.teacher:
        session.state.teacher = {**base, **session.metrics(teacher, val)}
    if resume is not None and partial is None:
        restore_stage(session, resume, student, disc, stage.epochs)
    if session.state.stage < stage.index:
        if partial is None:
            acp_prune(session, teacher, pruner, base, metric)
        plain = LossConfig(WeightedLoss(1.0), KDLoss(weight=0.0), WeightedLoss(0.0), WeightedLoss(0.0))
        losses = plain if cfg.acp.final == "finetune" else None
        restore, start = (resume, (partial["epoch"], partial["batch"])) if partial else (None, (0, 0))
        prepared = recover(
            session, stage, student, teacher, disc, taps, pruner, restore=restore, start=start, losses=losses, val=val
        )
        end_stage(session, stage, prepared, val, base, pruner)
    return session.finish(student, finished=ended, history=pruner.history(), teacher=teacher)
