"""A stage's recovery by adversarial distillation: its optimizers, the training loop (resumable mid-stage), the
recovery curve and the stage's end (evaluate, table row, checkpoint). Shared by the pruning modes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from aip.compiled import compiled
from aip.config import LossConfig
from aip.distill.features import FeatureTaps
from aip.distill.step import StepParts
from aip.guards import NonFiniteError
from aip.prune.pruner import ChannelPruner
from aip.prune.sparsity import group_norm_regularizer
from aip.session import Session


@dataclass
class Stage:
    """One stage of the run: an optional prune to `target` (a cost ratio), then `epochs` of recovery."""

    index: int
    kind: str  # "prune", "finetune" or "acp"
    epochs: int
    target: float | None
    interval: int | None = None  # which pruning interval (1-based) a stage that prunes is


def stage_losses(losses: LossConfig, stage: Stage) -> LossConfig:
    """The stage's losses: `loss.at.schedule: after_prune` ramps attention transfer over a stage that begins with a
    prune (the student first recovers from the cut on the other terms) and warms it up over the first half of the
    others (no full weight at the learning rate's restart)."""
    if losses.at.schedule != "after_prune":
        return losses
    schedule = "ramp" if stage.target is not None else "warmup"
    return dataclasses.replace(losses, at=dataclasses.replace(losses.at, schedule=schedule))


def stage_optimizers(session: Session, student: nn.Module, disc: nn.Module, epochs: int) -> list[Any]:
    """Fresh student and discriminator optimizers and the student's lr schedule for a stage of `epochs`."""
    cfg = session.cfg
    opt_s = session.optimizer(student)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=(cfg.disc.beta1, cfg.disc.beta2))
    sched = session.scheduler(opt_s, session.steps_per_epoch(session.train_loader()) * max(epochs, 1))
    return [opt_s, opt_d, sched]


def restore_stage(session: Session, source: Path, student: nn.Module, disc: nn.Module, epochs: int) -> None:
    """Weights, optimizer and RNG states of the stage-end checkpoint `source`."""
    session.restore(source, student, disc, *stage_optimizers(session, student, disc, epochs))


def recover(
    session: Session,
    stage: Stage,
    student: nn.Module,
    teacher: nn.Module,
    disc: nn.Module,
    taps: list[str],
    pruner: ChannelPruner,
    restore: Path | None = None,
    start: tuple[int, int] = (0, 0),
    losses: LossConfig | None = None,
    val: DataLoader | None = None,
) -> nn.Module:
    """Train the student against the teacher and the discriminator for the stage's epochs.

    With `restore` (a mid-stage checkpoint), optimizer and scheduler states come back and training goes on at
    `start` = (epoch, batches done): that epoch is re-seeded and its first batches are skipped by index, without
    loading them; each batch's augmentation has seeds of its own, so the rest continues as in an unbroken run.
    `global_step` counts optimizer steps: `checkpoint.every_n_steps` and the logs go by it.
    With `train.eval_each_epoch` and `val`, the student is evaluated after the prune and after every epoch but the
    last (`end_stage` evaluates that one): the recovery curve.
    """
    acc, cfg, state = session.accelerator, session.cfg, session.state
    student_p, disc_p, opt_s, opt_d, sched, train = session.prepare(
        student, disc, *stage_optimizers(session, student, disc, stage.epochs), session.train_loader()
    )
    if restore is not None:
        session.load_state(restore)
    every = cfg.checkpoint.every_n_steps
    regularize = None
    if stage.kind == "sparsity":  # built before the taps hook the student: Torch-Pruning traces it
        regularize = group_norm_regularizer(pruner, cfg.prune.sparsity.weight)
    with (
        ExitStack() as stack,
        FeatureTaps(teacher, taps) as t_taps,
        FeatureTaps(student, taps) as s_taps,
        compiled(acc.unwrap_model(student_p), cfg.train.compile),  # afresh for this stage's architecture
    ):
        parts = StepParts(acc, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, t_taps, s_taps, regularize)
        step = stack.enter_context(
            session.task.distill_step(parts, stage_losses(losses or cfg.loss, stage), cfg.disc.steps)
        )
        for epoch in range(start[0], stage.epochs):
            session.seed(stage.index, epoch)
            student_p.train()
            disc_p.train()
            done = start[1] if epoch == start[0] else 0  # batches seen before the checkpoint resumed from
            if epoch == 0 and done == 0 and stage.kind != "finetune":
                curve_point(session, stage, 0, student_p, val)
            if done >= len(train):
                if epoch + 1 < stage.epochs:
                    curve_point(session, stage, epoch + 1, student_p, val)
                continue
            batches = acc.skip_first_batches(train, done) if done else train
            bar = session.bar(batches, f"stage {stage.index} epoch {epoch + 1}/{stage.epochs}")
            for batch, (x, y) in enumerate(bar, start=done):
                try:
                    loss, terms = step(session.train_inputs(x, batch), y)
                except NonFiniteError as exc:
                    where = f"stage {stage.index} ({stage.kind}), epoch {epoch + 1}"
                    raise NonFiniteError(f"{where}, step {state.global_step + 1}: {exc}") from None
                if not acc.sync_gradients:
                    continue  # a micro-batch of gradient accumulation: no optimizer step yet
                state.global_step += 1
                if state.global_step % cfg.train.log_every == 0:
                    values = {k: v.item() for k, v in terms.items()}
                    values["loss"] = loss.item()
                    task_loss = values[session.task.loss_key]
                    bar.set_postfix(loss=f"{values['loss']:.3f}", task=f"{task_loss:.3f}")
                    session.log({f"train/{k}": v for k, v in values.items()}, state.global_step)
                    session.log({"train/lr": sched.get_last_lr()[0]}, state.global_step)
                if every and state.global_step % every == 0:
                    partial = {"stage": stage.index, "epoch": epoch, "batch": batch + 1}
                    session.save_checkpoint(stage.index, pruner.history(), step=state.global_step, partial=partial)
            if epoch + 1 < stage.epochs:
                curve_point(session, stage, epoch + 1, student_p, val)
    return student_p


def curve_point(session: Session, stage: Stage, epoch: int, student: nn.Module, val: DataLoader | None) -> None:
    """With `train.eval_each_epoch`: the student's main metric after `epoch` recovery epochs of `stage` (0: just
    pruned), once per point (a resumed stage does not add it twice), in the run state and the logs."""
    if val is None or not session.cfg.train.eval_each_epoch:
        return
    if any(p["stage"] == stage.index and p["epoch"] == epoch for p in session.state.curve):
        return
    key = session.task.metrics[0]
    record_curve(session, stage, epoch, key, session.metrics(student, val)[key])


def record_curve(session: Session, stage: Stage, epoch: int, key: str, value: float) -> None:
    """One point of the recovery curve, in the run state (so checkpoints carry it) and the logs."""
    session.state.curve.append({"stage": stage.index, "kind": stage.kind, "epoch": epoch, key: value})
    session.log({f"curve/{key}": value}, len(session.state.curve))


def end_stage(
    session: Session,
    stage: Stage,
    student: nn.Module,
    val: DataLoader,
    base: dict[str, float],
    pruner: ChannelPruner,
    latency: Callable[[nn.Module], float] | None = None,
) -> None:
    """Evaluate the recovered student, add its row to the table (with `latency_ms` when `latency` measures it),
    log it and checkpoint the stage."""
    metrics = session.metrics(student, val)
    key = session.task.metrics[0]
    row = {"stage": stage.index, "kind": stage.kind, **session.cost(student), **metrics}
    if latency is not None:
        row["latency_ms"] = latency(student)
    session.state.rows.append(row)
    if session.cfg.train.eval_each_epoch:
        record_curve(session, stage, stage.epochs, key, row[key])
    session.state.stage = stage.index
    session.log({**{f"stage/{k}": v for k, v in metrics.items()}, "stage/params": row["params"]}, stage.index)
    session.log({"stage/flops": row["flops"]}, stage.index)
    session.print(
        f"stage {stage.index} ({stage.kind}): {session.task.describe(metrics)}  "
        f"FLOPs {row['flops'] / base['flops']:.3f}  params {row['params'] / base['params']:.3f}"
        + (f"  latency {row['latency_ms'] / base['latency']:.3f}" if latency is not None else "")
    )
    session.save_checkpoint(stage.index, pruner.history())
