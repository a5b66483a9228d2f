"""`mode: train` (plain supervised training) and the teacher of the pruning methods: the given one, a saved one, or
one trained here first."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from aip.accel import strip_autocast
from aip.compiled import compiled
from aip.errors import ConfigError
from aip.guards import HINT, NonFiniteError, check_losses, check_outputs
from aip.models.pretrained import head_note, wants_pretrained
from aip.report import write_report
from aip.session import Outcome, Session

TEACHER_FILE = "teacher.pt"


def train_supervised(session: Session, model: nn.Module, epochs: int, tag: str) -> nn.Module:
    """Plain supervised training with the task's loss (mode `train`, and the teacher of `mode: aip` if none)."""
    acc, cfg = session.accelerator, session.cfg
    raw_train = session.train_loader()
    optimizer = session.optimizer(model)
    scheduler = session.scheduler(optimizer, session.steps_per_epoch(raw_train) * epochs)
    model, optimizer, scheduler, train, val = session.prepare(
        model, optimizer, scheduler, raw_train, session.val_loader()
    )
    step = 0
    with compiled(acc.unwrap_model(model), cfg.train.compile):
        for epoch in range(epochs):
            session.seed(0, epoch)
            model.train()
            bar = session.bar(train, f"{tag} epoch {epoch + 1}/{epochs}", leave=False)
            for batch, (x, y) in enumerate(bar):
                with acc.accumulate(model):
                    loss = session.task.loss(model, session.train_inputs(x, batch), y)
                    acc.backward(loss)
                    try:
                        check_losses({"loss_ce": loss}, acc)  # before the step: a NaN never reaches the weights
                    except NonFiniteError as exc:
                        raise NonFiniteError(f"{tag} training, epoch {epoch + 1}, step {step + 1}: {exc}") from None
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % cfg.train.log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    session.log({f"{tag}/loss_ce": loss.item(), f"{tag}/lr": scheduler.get_last_lr()[0]}, step)
            check_example_outputs(session, acc.unwrap_model(model), f"{tag} training, epoch {epoch + 1}", HINT)
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
                metrics = session.metrics(model, val)
                session.log({f"{tag}/{k}": v for k, v in metrics.items()}, epoch + 1)
                session.print(f"{tag} epoch {epoch + 1}/{epochs}: {session.task.describe(metrics)}")
    model = strip_autocast(acc.unwrap_model(model))  # a teacher computes in fp32 whether trained or loaded
    acc.free_memory()
    return model


def run_train(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """`mode: train`: supervised training; writes model.pt (usable as model.teacher_checkpoint) and the report.
    It writes no stage checkpoints, so there is nothing to resume or branch from."""
    if resume is not None or branch is not None:
        raise ConfigError("mode train writes no stage checkpoints; it takes no --resume checkpoint or --from-stage")
    note = head_note(session.cfg.model, session.data.num_classes) if wants_pretrained(session.cfg.model) else None
    if note is not None:
        session.print(note)
    model = train_supervised(session, session.new_model(), session.cfg.train.epochs, "train")
    session.save_weights(model, session.run_dir / "model.pt")
    device = session.accelerator.device
    metrics = session.metrics(model.to(device), session.accelerator.prepare(session.val_loader()))
    row = {**session.cost(model), **metrics}
    if session.main:
        table = write_report(session.run_dir, row, [])
        session.print(f"\n{table}\n\nweights: {session.run_dir / 'model.pt'}")
    session.close()
    return Outcome({"teacher": row, "stages": []}, model)


def load_teacher(session: Session, source_run: Path | None = None) -> nn.Module:
    """The frozen teacher: the given model, the configured checkpoint, this run's (or the source run's) saved one,
    the pretrained model as it is when its head fits the data, or one trained (a pretrained one fine-tuned) here
    (saved as teacher.pt)."""
    cfg, run_dir = session.cfg, session.run_dir
    candidates = [Path(cfg.model.teacher_checkpoint)] if cfg.model.teacher_checkpoint else []
    candidates += [run_dir / TEACHER_FILE] + ([source_run / TEACHER_FILE] if source_run else [])
    path = next((p for p in candidates if p.is_file()), None)
    pretrained = session.model is None and wants_pretrained(cfg.model)
    replaced = head_note(cfg.model, session.data.num_classes) if pretrained else None
    if session.model is not None:
        model = session.new_model()
    elif path is not None:
        model = session.load_weights(path)
    elif pretrained and replaced is None:
        session.print(f"teacher: the pretrained {cfg.model.name} as it is (its head fits the data's classes)")
        model = session.new_model()
    else:
        what = f"{replaced}; fine-tuning the teacher" if pretrained else "no teacher checkpoint: training one"
        session.print(f"{what} for {cfg.train.teacher_epochs} epochs")
        model = train_supervised(session, session.new_model(), cfg.train.teacher_epochs, "teacher")
        session.save_weights(model, run_dir / TEACHER_FILE)
    model = model.to(session.accelerator.device).eval()
    model.requires_grad_(False)
    if session.model is not None:
        cause = "the model given computes NaN or infinity; check its weights"
    elif path is not None:
        cause = f"the weights in {str(path)!r} overflow; check or replace the file"
    elif pretrained and replaced is None:
        cause = f"the pretrained {cfg.model.name} computes NaN or infinity on this data; check its weights"
    else:
        cause = f"teacher training diverged; lower train.lr (now {cfg.train.lr:g}) or check the data"
    check_example_outputs(session, model, "teacher", cause)
    return model


def check_example_outputs(session: Session, model: nn.Module, what: str, cause: str) -> None:
    """The model's outputs in eval mode on the example batch (through the task's prunable view) must be finite:
    batch statistics can keep a training loss finite while the running statistics or weights have overflowed."""
    view, example, _ = session.task.prunable(model, session.example.to(session.accelerator.device))
    check_outputs(what, view, example, cause)


def copy_teacher(source_run: Path, run_dir: Path) -> None:
    """Give a branched run its own copy of the source run's teacher, so it stands alone."""
    src = source_run / TEACHER_FILE
    if src.is_file() and not (run_dir / TEACHER_FILE).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, run_dir / TEACHER_FILE)
