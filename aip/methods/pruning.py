"""What the pruning modes (aip, acp) share: the run set up from the teacher to the first stage (checks, teacher,
student, pruner, taps, discriminator, costs, validation loader, a checkpoint's architecture and run state), the
target, `prune.round_to` and the run's end."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from aip import checkpoint as ckpt
from aip.config import Config, ConfigError, LossConfig
from aip.distill.parts import check_taps, discriminator, tap_names
from aip.methods.processes import on_main
from aip.methods.recovery import Stage, recover, restore_stage
from aip.methods.train import copy_teacher, load_teacher
from aip.prune.latency import measure_latency
from aip.prune.pruner import ChannelPruner
from aip.prune.restore import restore_pruned
from aip.prune.rounding import device_round_to
from aip.prune.schedule import interval_targets
from aip.session import Outcome, RunState, Session


def target_ratio(cfg: Config) -> float:
    """The fraction of the teacher's FLOPs (or parameters, or measured latency) the final student keeps."""
    p = cfg.prune
    return next(r for r in (p.target_flops_ratio, p.target_params_ratio, p.target_latency_ratio) if r is not None)


def target_metric(cfg: Config) -> str:
    """What the target counts: flops, params or latency (milliseconds)."""
    p = cfg.prune
    return "flops" if p.target_flops_ratio is not None else "params" if p.target_params_ratio is not None else "latency"


def plan_stages(cfg: Config, kind: str = "prune") -> list[Stage]:
    """With `prune.sparsity.epochs`, stage 1 trains the unpruned student sparse; then S stages prune to the
    schedule's targets and recover (as `kind`); a last stage fine-tunes when finetune_epochs > 0."""
    targets = interval_targets(target_ratio(cfg), cfg.prune.intervals, cfg.prune.schedule)
    sparse = cfg.prune.sparsity.epochs
    stages = [Stage(1, "sparsity", sparse, None)] if sparse > 0 else []
    stages += [Stage(len(stages) + i + 1, kind, cfg.prune.epochs_between, t, i + 1) for i, t in enumerate(targets)]
    if cfg.prune.finetune_epochs > 0:
        stages.append(Stage(len(stages) + 1, "finetune", cfg.prune.finetune_epochs, None))
    return stages


def timing_batch(session: Session) -> torch.Tensor:
    """The example input repeated to data.batch_size on the run's device: what latencies are measured on."""
    example = session.example.to(session.accelerator.device)
    return example.repeat(session.cfg.data.batch_size, *[1] * (example.dim() - 1))


def round_to(session: Session, saved: dict[str, Any] | None = None) -> int:
    """`prune.round_to` as a number: `auto` becomes the main process's device's channel block (logged), which every
    process then uses, so that all prune the same channels. A run that goes on from a checkpoint (`saved`, its run
    state) keeps the value it started with, whatever machine it resumes on: its widths lie on that grid."""
    value = session.cfg.prune.round_to
    if value != "auto":
        return value or 1
    kept = (saved or {}).get("round_to")
    kept = kept or next((e["round_to"] for e in (saved or {}).get("pruning_log", []) if e.get("round_to")), None)
    if kept is not None:
        found, source = int(kept), "kept from the run's start"
    else:
        found, source = on_main(session, lambda: device_round_to(session.accelerator.device))
    session.state.round_to = found
    session.print(f"prune.round_to auto: {found} ({source})")
    return found


def check_round_to(session: Session) -> None:
    """Before any training: a `prune.round_to` no narrower than every prunable group would leave nothing to prune
    (each group keeps a multiple of it, or stays whole), which would surface only after the teacher was trained."""
    value = session.cfg.prune.round_to
    if not isinstance(value, int) or value <= 1:
        return
    model = session.probe_model().to(session.accelerator.device)
    prunable, example, ignored = session.task.prunable(model, session.example.to(session.accelerator.device))
    widest = max(ChannelPruner(prunable, example, ignored, session.cfg.prune.max_layer_ratio).widths().values())
    if value >= widest:
        raise ConfigError(
            f"prune.round_to: {value} leaves nothing to prune: the widest prunable group has {widest} channels and "
            f"keeps a multiple of it; use a smaller multiple (8 or 16 suit most hardware) or null"
        )


@dataclass
class PruningRun:
    """A pruning run between its setup and its end: what every stage works on, and where it started from."""

    session: Session
    teacher: nn.Module
    student: nn.Module
    pruner: ChannelPruner
    taps: list[str]
    disc: nn.Module
    base: dict[str, float]  # the teacher's params and FLOPs (and latency, for a latency target)
    metric: str
    val: DataLoader
    resume: Path | None = None
    partial: dict[str, int] | None = None  # where a mid-stage checkpoint stopped
    ended: bool = False  # resumed from the last stage's end: nothing left to train (`begin`)

    def resuming_in(self, stage: Stage) -> bool:
        """Whether `stage` goes on from a mid-stage checkpoint (its prune is already done)."""
        return self.partial is not None and self.partial["stage"] == stage.index

    def begin(self, stages: list[Stage]) -> None:
        """Before the first stage: on a resume from a stage-end checkpoint, the weights, optimizer and RNG states it
        holds, and whether the run had already ended (then `finish` only repairs its exports)."""
        if self.resume is not None and self.partial is None:
            self.ended = self.session.state.stage >= stages[-1].index
            epochs = next((s.epochs for s in stages if s.index == self.session.state.stage), 1)
            restore_stage(self.session, self.resume, self.student, self.disc, epochs)

    def recover(self, stage: Stage, losses: LossConfig | None = None, teacher: nn.Module | None = None) -> nn.Module:
        """The stage's recovery (`recover`) from `teacher` (default: the run's), from a mid-stage checkpoint where
        the run resumes inside it."""
        here = self.resuming_in(stage)
        return recover(
            self.session,
            stage,
            self.student,
            teacher if teacher is not None else self.teacher,
            self.disc,
            self.taps,
            self.pruner,
            restore=self.resume if here else None,
            start=(self.partial["epoch"], self.partial["batch"]) if here else (0, 0),
            losses=losses,
            val=self.val,
        )

    def finish(self) -> Outcome:
        """Report and export; a resume of a run that had ended only repairs its exports."""
        finished = self.resume if self.ended else None
        return self.session.finish(self.student, finished=finished, history=self.pruner.history(), teacher=self.teacher)


def start_pruning(session: Session, resume: Path | None = None, branch: Path | None = None) -> PruningRun:
    """Checks, teacher (a branch copies its run's), student, pruner, taps, discriminator, the teacher's costs and
    row; from a checkpoint (`resume`, or `branch`: a new run from another run's stage), its architecture and run
    state (a branch takes the weights too; a resume gets them, with optimizer and RNG states, through Accelerate)."""
    acc, cfg = session.accelerator, session.cfg
    check_taps(session)
    check_round_to(session)
    source = resume or branch
    source_run = source.parent.parent if source is not None else None
    if branch is not None and session.main:
        copy_teacher(source_run, session.run_dir)
    acc.wait_for_everyone()
    teacher = load_teacher(session, source_run)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    history, meta = ckpt.read(source) if source is not None else ([], {})
    prunable, example, ignored = session.task.prunable(student, session.example.to(acc.device))
    grid = round_to(session, meta.get("state"))
    pruner = ChannelPruner(prunable, example, ignored, cfg.prune.max_layer_ratio, grid)
    taps = tap_names(session, student)
    disc = discriminator(session, taps)
    base: dict[str, float] = dict(session.cost(student))
    metric = target_metric(cfg)
    if metric == "latency":  # the teacher's, measured once (again on resume)
        base["latency"] = on_main(session, lambda: measure_latency(teacher, timing_batch(session)))
    val = acc.prepare_data_loader(session.val_loader())
    partial = None
    if source is not None:
        restore_pruned(pruner, student, history, source if branch is not None else None)
        session.state = RunState.restored(meta["state"], round_to=session.state.round_to)
        partial = meta.get("partial") if resume is not None else None
        if branch is not None:
            session.state.global_step = 0
        session.print(f"{'resumed' if resume else 'branched'} from {source} after stage {session.state.stage}")
    if not session.state.teacher:  # the report's teacher row names its latency as the stage rows do
        row = {("latency_ms" if k == "latency" else k): v for k, v in base.items()}
        session.state.teacher = {**row, **session.metrics(teacher, val)}
    return PruningRun(session, teacher, student, pruner, taps, disc, base, metric, val, resume, partial)
