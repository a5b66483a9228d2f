"""What the pruning methods share: a stage's recovery by adversarial distillation, its end (evaluate, table row,
checkpoint), the discriminator, calibration passes, and the checks that all processes pruned alike."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader

from aip.compiled import compiled
from aip.config import ConfigError, LossConfig
from aip.distill.discriminator import Discriminator
from aip.distill.features import FeatureTaps
from aip.distill.step import StepParts
from aip.guards import NonFiniteError
from aip.prune.pruner import ChannelPruner
from aip.seeding import derive_seed, seeded
from aip.session import Session


class RankMismatchError(RuntimeError):
    """Processes ended a prune with different architectures; continuing would corrupt DDP."""


@dataclass
class Stage:
    """One stage of the run: an optional prune to `target` (a cost ratio), then `epochs` of recovery."""

    index: int
    kind: str  # "prune", "finetune" or "acp"
    epochs: int
    target: float | None


def architecture_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer name and shape: equal iff two models have the same architecture."""
    shapes = [(n, tuple(t.shape)) for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    return format(int(hashlib.sha256(repr(shapes).encode()).hexdigest()[:15], 16), "x")


def check_same_architecture(session: Session, model: nn.Module, stage: int) -> list[str]:
    """Every process's architecture digest after a prune; stops the run if they differ."""
    digest = architecture_hash(model)
    acc = session.accelerator
    if acc.num_processes == 1:
        return [digest]
    codes = torch.tensor([int(digest, 16) % (1 << 62)], device=acc.device)
    gathered = [format(int(c), "x") for c in acc.gather(codes)]
    if len(set(gathered)) > 1:
        raise RankMismatchError(
            f"stage {stage}: processes pruned different channels (architecture digests {gathered}); "
            "use a deterministic criterion or reduce its statistics across processes"
        )
    return gathered


def calibration(session: Session, stage: int, batches: int | None = None) -> Callable[[nn.Module], None]:
    """Forward and backward passes on fixed training batches (the same on every process); `.grad` is averaged
    over processes. Gradient criteria read `.grad`, feature criteria and the capacity analysis hook the passes;
    called under torch.no_grad (a criterion that reads no gradients), it runs the forward passes only."""
    cfg = session.cfg

    def calibrate(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(cfg.seed * 7 + stage)
        loader = DataLoader(
            session.data.train,
            batch_size=cfg.data.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=session.task.collate,
        )
        device = session.accelerator.device
        with seeded(derive_seed(cfg.seed, "calibration", stage)):  # augmentation: not the global stream
            for i, (x, y) in enumerate(loader):
                if i == (batches or cfg.prune.calibration_batches):
                    break
                loss = session.task.loss(model, *send_to_device((x, y), device))
                if loss.requires_grad:
                    loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad = session.accelerator.reduce(p.grad, "mean")

    return calibrate


def uses_taps(session: Session) -> bool:
    """Whether anything reads tapped features: attention transfer, a detector's adversarial term, or a classifier's
    discriminator on attention maps."""
    cfg = session.cfg
    on_attention = session.task.disc_on_taps_only or cfg.disc.input == "attention"
    return cfg.loss.at.weight > 0 or (on_attention and cfg.loss.adv.weight > 0)


def model_label(session: Session) -> str:
    """The model as the user named it: the config's model.name, or the class of the model object given."""
    return session.cfg.model.name if session.model is None else f"{type(session.model).__qualname__} (the model given)"


def check_taps(session: Session) -> None:
    """Before any training, whenever anything uses tapped features: `model.taps` must name modules of the model
    (with close names), and without it the model's stages must be found when attention transfer needs them (a
    discriminator on attention maps alone falls back to the logits, see `tap_names`)."""
    cfg = session.cfg
    if not uses_taps(session):
        return
    model = session.probe_model()
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in cfg.model.taps or [] if t not in names]
    if missing:
        close = sorted({c for t in missing for c in difflib.get_close_matches(t, names, n=4, cutoff=0.6)})
        hint = f"close names: {', '.join(close)}" if close else f"its modules include: {', '.join(names[:12])}"
        raise ConfigError(f"model.taps: {model_label(session)} has no module {', '.join(map(repr, missing))}; {hint}")
    if not cfg.model.taps and cfg.loss.at.weight > 0:
        _default_taps(session, model)


def _default_taps(session: Session, model: nn.Module) -> list[str]:
    """The task's taps for `model` (its stages); a one-line ConfigError, naming the model, when none are found."""
    cfg = session.cfg
    named = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model_label(session)))
    try:
        return session.task.default_taps(model, named)
    except ValueError as exc:
        raise ConfigError(f"model.taps: {exc}; or set loss.at.weight: 0") from None


DISC_ON_LOGITS = (
    "disc.input attention: no stages found in {model} and model.taps is not set: the discriminator judges the "
    "logits instead (set model.taps to module names to judge attention maps)"
)


def tap_names(session: Session, student: nn.Module) -> list[str]:
    """Modules tapped for attention transfer (and the adversarial term on attention maps); none when unused (so any
    model works without them). A classifier whose stages cannot be found, with attention transfer off and no
    `model.taps`, gets none: its discriminator then judges the logits (`discriminator`), with a warning and a note
    in the report."""
    cfg = session.cfg
    if not uses_taps(session):
        return []
    if cfg.model.taps:
        return cfg.model.taps
    if cfg.loss.at.weight > 0 or session.task.disc_on_taps_only:
        return _default_taps(session, student)
    try:
        return _default_taps(session, student)
    except ConfigError:
        note = DISC_ON_LOGITS.format(model=model_label(session))
        session.print(f"warning: {note}")
        if note not in session.state.notes:
            session.state.notes.append(note)
        return []


def discriminator(session: Session, taps: list[str]) -> nn.Module:
    """A fresh discriminator initialised from a seed of its own, not from the global stream (whose state depends
    on whether the teacher was just trained or loaded), so that a restarted run builds the same one. On attention
    maps with no taps to read them from (`tap_names`' fallback), it judges the logits."""
    cfg = session.cfg
    kind = cfg.disc.input
    if kind == "attention" and not taps and uses_taps(session) and not session.task.disc_on_taps_only:
        kind = "logits"
    with seeded(derive_seed(cfg.seed, "discriminator")):
        width = session.task.disc_features(session.data.num_classes, taps, kind)
        disc = Discriminator(width, cfg.disc.hidden, kind)
    return disc.to(session.accelerator.device)


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
    with (
        ExitStack() as stack,
        FeatureTaps(teacher, taps) as t_taps,
        FeatureTaps(student, taps) as s_taps,
        compiled(acc.unwrap_model(student_p), cfg.train.compile),  # afresh for this stage's architecture
    ):
        parts = StepParts(acc, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, t_taps, s_taps)
        step = stack.enter_context(session.task.distill_step(parts, losses or cfg.loss, cfg.disc.steps))
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
