"""The training loop: recover a stage, evaluate, checkpoint, prune, re-prepare. Accelerate lives here.

`prune/` and `distill/` know nothing of each other or of training; this module composes them. The teacher is never
prepared: it stays frozen in eval mode and is moved to the device by hand. After each prune the student is unwrapped,
pruned in place, given fresh optimizers and prepared again, with `free_memory()` clearing what Accelerate had
registered so that no stale model or optimizer is saved with the next checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from aip import checkpoint as ckpt
from aip.accel import CPU_ONLY, mixed_precision, process_group_kwargs, step_before_update
from aip.checks import check_names
from aip.config import Config, ConfigError, KDLoss, LossConfig, WeightedLoss, save_config
from aip.data import DataBundle, build_data
from aip.distill.attention import attention_loss
from aip.distill.discriminator import Discriminator
from aip.distill.features import FeatureTaps
from aip.distill.losses import adversarial_loss, discriminator_loss, kd_loss
from aip.export import EXPORT_FILE, write_exports
from aip.export import FILES as EXPORT_FILES
from aip.guards import NonFiniteError, check_losses, check_modules, check_state
from aip.models import classifier_of, create_model, default_taps
from aip.models.weights import load_into, load_state_dict_file
from aip.prune.capacity import LayerCapacity, estimate_capacity
from aip.prune.cost import model_cost
from aip.prune.importance import create_importance, criterion_for_interval
from aip.prune.pruner import ChannelPruner
from aip.prune.schedule import interval_targets
from aip.report import write_report
from aip.search.fitness import SearchData, channel_responses, cut_to_widths, recovered_top1, split_search_data, spread
from aip.seeding import SeededBatches, derive_seed, seeded

TEACHER_FILE = "teacher.pt"


class RankMismatchError(RuntimeError):
    """Processes ended a prune with different architectures; continuing would corrupt DDP."""


@dataclass
class Stage:
    """One stage of the run: an optional prune to `target` (a cost ratio), then `epochs` of recovery."""

    index: int
    kind: str  # "prune" or "finetune"
    epochs: int
    target: float | None


@dataclass
class RunState:
    """What the loop carries from stage to stage and stores in every checkpoint's meta."""

    stage: int = 0
    global_step: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    pruning_log: list[dict[str, Any]] = field(default_factory=list)
    capacity: dict[str, dict[str, Any]] = field(default_factory=dict)


def target_ratio(cfg: Config) -> float:
    """The fraction of the teacher's FLOPs (or parameters) the final student keeps."""
    p = cfg.prune
    return p.target_flops_ratio if p.target_flops_ratio is not None else p.target_params_ratio


def plan_stages(cfg: Config) -> list[Stage]:
    """Stages 1..S prune to the schedule's targets and recover; stage S+1 fine-tunes when finetune_epochs > 0."""
    targets = interval_targets(target_ratio(cfg), cfg.prune.intervals, cfg.prune.schedule)
    stages = [Stage(i + 1, "prune", cfg.prune.epochs_between, t) for i, t in enumerate(targets)]
    if cfg.prune.finetune_epochs > 0:
        stages.append(Stage(len(stages) + 1, "finetune", cfg.prune.finetune_epochs, None))
    return stages


def architecture_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer name and shape: equal iff two models have the same architecture."""
    shapes = [(n, tuple(t.shape)) for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    return format(int(hashlib.sha256(repr(shapes).encode()).hexdigest()[:15], 16), "x")


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


@dataclass
class DistillStep:
    """One AIP training step on a batch: the discriminator learns teacher (real) from student (fake) outputs, then
    the student learns from CE, KD, attention transfer and the adversarial loss through the bare discriminator
    (its weights fixed), so DDP never reduces the discriminator's gradients in the student's backward.

    Raises NonFiniteError, before the student's optimizer steps, when a loss term is NaN or infinite."""

    accelerator: Accelerator
    teacher: nn.Module
    student: nn.Module  # prepared
    disc: nn.Module  # prepared: the discriminator's own step goes through DDP
    disc_raw: nn.Module  # the same module unwrapped: the student's adversarial term goes through it
    opt_s: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched: Any
    t_taps: FeatureTaps
    s_taps: FeatureTaps
    losses: LossConfig

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acc, w = self.accelerator, self.losses
        use_adv = w.adv.weight > 0
        with torch.no_grad(), acc.autocast():
            t_logits = self.teacher(x)
        t_feats = list(self.t_taps.outputs)
        with acc.accumulate(self.student, self.disc):
            s_logits = self.student(x)
            s_feats = list(self.s_taps.outputs)
            terms: dict[str, torch.Tensor] = {}
            if use_adv:
                d_out = self.disc(torch.cat([t_logits.detach(), s_logits.detach()]).float())
                terms["loss_d"] = discriminator_loss(d_out[: len(x)], d_out[len(x) :])
                acc.backward(terms["loss_d"])
                step_before_update(self.opt_d)  # the student's step updates the shared fp16 scale, once
                self.opt_d.zero_grad(set_to_none=True)
            terms["loss_ce"] = F.cross_entropy(s_logits.float(), y)
            terms["loss_kd"] = kd_loss(s_logits.float(), t_logits.float(), w.kd.temperature, w.kd.kind)
            terms["loss_at"] = attention_loss(s_feats, t_feats) if w.at.weight > 0 else x.new_zeros(())
            loss = w.ce.weight * terms["loss_ce"] + w.kd.weight * terms["loss_kd"] + w.at.weight * terms["loss_at"]
            if use_adv:
                self.disc_raw.requires_grad_(False)
                terms["loss_adv"] = adversarial_loss(self.disc_raw(s_logits.float()))
                self.disc_raw.requires_grad_(True)
                loss = loss + w.adv.weight * terms["loss_adv"]
            acc.backward(loss)
            check_losses({**terms, "loss": loss}, acc)  # before the step: a NaN never reaches the weights
            self.opt_s.step()
            self.sched.step()
            self.opt_s.zero_grad(set_to_none=True)
        return loss, terms


class Engine:
    """Runs one configured job (`mode: train` or `mode: aip`) in one run directory."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        check_names(cfg)  # load_config checks values only; the registry names before any work, for every caller
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        group = process_group_kwargs(cfg)
        self.accelerator = Accelerator(
            cpu=CPU_ONLY,
            mixed_precision=mixed_precision(cfg),
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            kwargs_handlers=[InitProcessGroupKwargs(**group)] if group else None,
        )
        self.main = self.accelerator.is_main_process
        if self.main:  # a run directory's config is written once, by the run that starts it; resume keeps it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "config.yaml").exists():
                save_config(cfg, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        set_seed(cfg.seed)
        self.data: DataBundle = build_data(cfg.data)
        self.example = self.data.train[0][0].unsqueeze(0)
        self.writer = SummaryWriter(str(self.run_dir / "tb")) if self.main else None
        self.state = RunState()
        self._loader_gen = torch.Generator()
        self._batches = SeededBatches(self.data.train)  # each batch fetched with seeds of its own: see _seed

    # ----------------------------------------------------------------- helpers
    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def _bar(self, iterable: Any, desc: str, leave: bool = True) -> tqdm:
        """A progress bar on rank 0, on a terminal only: in a log or a pipe it would be stray text before an error."""
        return tqdm(iterable, desc=desc, disable=None if self.main else True, leave=leave)

    def _seed(self, stage: int, epoch: int) -> None:
        """Seed everything from (seed, stage, epoch) so a resumed stage draws the same data as an unbroken run:
        the shuffle, and each training batch's augmentation (seeded from this value and the batch's indices, so a
        resumed epoch skips its first batches by index and still draws what follows them)."""
        value = (self.cfg.seed * 100_003 + stage * 1_009 + epoch) % 2**32  # NumPy takes seeds below 2**32
        set_seed(value)
        self._loader_gen.manual_seed(value)
        self._batches.seed = value

    def train_loader(self) -> DataLoader:
        return DataLoader(
            self._batches,
            batch_size=self.cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.cfg.data.num_workers,
            generator=self._loader_gen,
        )

    def val_loader(self) -> DataLoader:
        return DataLoader(
            self.data.val, batch_size=self.cfg.data.eval_batch_size, num_workers=self.cfg.data.num_workers
        )

    def new_model(self) -> nn.Module:
        m = self.cfg.model
        return create_model(m.name, self.data.num_classes, self.data.input_shape[0], m.kwargs, self.example)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        # Accelerate steps a prepared scheduler once per process for every optimizer step, hence the factor.
        total = max(1, total_steps * self.accelerator.num_processes)
        kind = self.cfg.train.scheduler
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        if kind == "step":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, total * 3 // 4], gamma=0.1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def _steps_per_epoch(self, loader: DataLoader) -> int:
        """Optimizer steps per epoch on one process, for a loader not yet sharded by `prepare`."""
        per_process = math.ceil(len(loader) / self.accelerator.num_processes)
        return max(1, per_process // self.cfg.train.grad_accum_steps)

    def cost(self, model: nn.Module) -> dict[str, int]:
        c = model_cost(self.accelerator.unwrap_model(model), self.example.to(self.accelerator.device))
        return {"params": c.params, "flops": c.flops}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> tuple[float, float]:
        """Top-1 and top-5 (%) over the whole validation set, each sample counted once across processes."""
        was_training = model.training
        model.eval()
        correct1 = correct5 = total = 0
        for x, y in loader:
            with self.accelerator.autocast():
                logits = model(x)
            logits, y = self.accelerator.gather_for_metrics((logits, y))
            c1, c5 = _topk_correct(logits.float(), y)
            correct1 += int(c1)
            correct5 += int(c5)
            total += y.numel()
        model.train(was_training)
        return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)

    # ------------------------------------------------------- supervised training
    def train_supervised(self, model: nn.Module, epochs: int, tag: str) -> nn.Module:
        """Plain cross-entropy training (mode `train`, and the teacher of `mode: aip` when none is given)."""
        acc = self.accelerator
        acc.free_memory()
        raw_train = self.train_loader()
        optimizer = self._optimizer(model)
        scheduler = self._scheduler(optimizer, self._steps_per_epoch(raw_train) * epochs)
        model, optimizer, scheduler, train, val = acc.prepare(model, optimizer, scheduler, raw_train, self.val_loader())
        step = 0
        for epoch in range(epochs):
            self._seed(0, epoch)
            model.train()
            bar = self._bar(train, f"{tag} epoch {epoch + 1}/{epochs}", leave=False)
            for x, y in bar:
                with acc.accumulate(model):
                    loss = F.cross_entropy(model(x), y)
                    acc.backward(loss)
                    try:
                        check_losses({"loss_ce": loss}, acc)  # before the step: a NaN never reaches the weights
                    except NonFiniteError as exc:
                        raise NonFiniteError(f"{tag} training, epoch {epoch + 1}, step {step + 1}: {exc}") from None
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % self.cfg.train.log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    self.log({f"{tag}/loss_ce": loss.item(), f"{tag}/lr": scheduler.get_last_lr()[0]}, step)
            if (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == epochs:
                top1, top5 = self.evaluate(model, val)
                self.log({f"{tag}/top1": top1, f"{tag}/top5": top5}, epoch + 1)
                self.print(f"{tag} epoch {epoch + 1}/{epochs}: top-1 {top1:.2f}  top-5 {top5:.2f}")
        model = acc.unwrap_model(model)
        acc.free_memory()
        return model

    def save_weights(self, model: nn.Module, path: Path) -> None:
        """Write `model`'s weights to `path` (rank 0), never weights that hold a NaN or an infinity."""
        check_state(str(path), model.state_dict())
        if self.main:
            tmp = path.with_name(path.name + ".tmp")
            payload = {"model": self.cfg.model.name, "num_classes": self.data.num_classes}
            torch.save({**payload, "state_dict": model.state_dict()}, tmp)
            tmp.replace(path)
        self.accelerator.wait_for_everyone()

    def load_weights(self, path: Path) -> nn.Module:
        """A model of the configured family with weights from a teacher file: ours, or one as people have them
        (aip/models/weights.py). Trust and key renames apply to the configured model.teacher_checkpoint only."""
        m = self.cfg.model
        given = m.teacher_checkpoint is not None and Path(path).resolve() == Path(m.teacher_checkpoint).resolve()
        state = load_state_dict_file(path, m.trust_checkpoint and given, m.checkpoint_rename if given else None)
        model = self.new_model()
        what = f"model.teacher_checkpoint {str(path)!r} (model.name={m.name!r}, {self.data.num_classes} classes)"
        load_into(model, state, what)
        return model

    def run_train(self) -> dict[str, Any]:
        """`mode: train`: supervised training; writes model.pt (usable as model.teacher_checkpoint) and the report."""
        model = self.train_supervised(self.new_model(), self.cfg.train.epochs, "train")
        self.save_weights(model, self.run_dir / "model.pt")
        top1, top5 = self.evaluate(model.to(self.accelerator.device), self.accelerator.prepare(self.val_loader()))
        row = {**self.cost(model), "top1": top1, "top5": top5}
        if self.main:
            table = write_report(self.run_dir, row, [])
            self.print(f"\n{table}\n\nweights: {self.run_dir / 'model.pt'}")
        return {"teacher": row, "stages": []}

    # ------------------------------------------------------------------- AIP
    def teacher(self, source_run: Path | None = None) -> nn.Module:
        """The frozen teacher: the configured checkpoint, this run's (or the source run's) saved one, or train one."""
        candidates = [Path(self.cfg.model.teacher_checkpoint)] if self.cfg.model.teacher_checkpoint else []
        candidates += [self.run_dir / TEACHER_FILE] + ([source_run / TEACHER_FILE] if source_run else [])
        path = next((p for p in candidates if p.is_file()), None)
        if path is not None:
            model = self.load_weights(path)
        else:
            self.print(f"no teacher checkpoint: training one for {self.cfg.train.teacher_epochs} epochs")
            model = self.train_supervised(self.new_model(), self.cfg.train.teacher_epochs, "teacher")
            self.save_weights(model, self.run_dir / TEACHER_FILE)
        model = model.to(self.accelerator.device).eval()
        model.requires_grad_(False)
        return model

    def _calibrate(self, stage: int, batches: int | None = None) -> Callable[[nn.Module], None]:
        """Forward and backward passes on fixed training batches (the same on every process); `.grad` is averaged
        over processes. Gradient criteria read `.grad`, feature criteria and the capacity analysis hook the passes."""

        def calibrate(model: nn.Module) -> None:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7 + stage)
            loader = DataLoader(self.data.train, batch_size=self.cfg.data.batch_size, shuffle=True, generator=gen)
            device = self.accelerator.device
            with seeded(derive_seed(self.cfg.seed, "calibration", stage)):  # augmentation: not the global stream
                for i, (x, y) in enumerate(loader):
                    if i == (batches or self.cfg.prune.calibration_batches):
                        break
                    F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, "mean")

        return calibrate

    def _check_same_architecture(self, model: nn.Module, stage: int) -> list[str]:
        """Every process's architecture digest after a prune; stops the run if they differ."""
        digest = architecture_hash(model)
        if self.accelerator.num_processes == 1:
            return [digest]
        codes = torch.tensor([int(digest, 16) % (1 << 62)], device=self.accelerator.device)
        gathered = [format(int(c), "x") for c in self.accelerator.gather(codes)]
        if len(set(gathered)) > 1:
            raise RankMismatchError(
                f"stage {stage}: processes pruned different channels (architecture digests {gathered}); "
                "use a deterministic criterion or reduce its statistics across processes"
            )
        return gathered

    def _recover(
        self,
        stage: Stage,
        student: nn.Module,
        teacher: nn.Module,
        disc: nn.Module,
        taps: list[str],
        pruner: ChannelPruner,
        restore: Path | None = None,
        start: tuple[int, int] = (0, 0),
        losses: LossConfig | None = None,
    ) -> nn.Module:
        """Train the student against the teacher and the discriminator for the stage's epochs.

        With `restore` (a mid-stage checkpoint), optimizer and scheduler states come back and training goes on at
        `start` = (epoch, batches done): that epoch is re-seeded and its first batches are skipped by index, without
        loading them; each batch's augmentation has seeds of its own, so the rest continues as in an unbroken run.
        `global_step` counts optimizer steps: `checkpoint.every_n_steps` and the logs go by it.
        """
        acc, cfg = self.accelerator, self.cfg
        acc.free_memory()
        student_p, disc_p, opt_s, opt_d, sched, train = acc.prepare(
            student, disc, *self._stage_optimizers(student, disc, stage.epochs), self.train_loader()
        )
        if restore is not None:
            acc.load_state(str(restore / ckpt.STATE_DIR))
        every = cfg.checkpoint.every_n_steps
        with FeatureTaps(teacher, taps) as t_taps, FeatureTaps(student, taps) as s_taps:
            step = DistillStep(
                acc, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, t_taps, s_taps, losses or cfg.loss
            )
            for epoch in range(start[0], stage.epochs):
                self._seed(stage.index, epoch)
                student_p.train()
                disc_p.train()
                done = start[1] if epoch == start[0] else 0  # batches seen before the checkpoint resumed from
                if done >= len(train):
                    continue
                batches = acc.skip_first_batches(train, done) if done else train
                bar = self._bar(batches, f"stage {stage.index} epoch {epoch + 1}/{stage.epochs}")
                for batch, (x, y) in enumerate(bar, start=done):
                    try:
                        loss, terms = step(x, y)
                    except NonFiniteError as exc:
                        where = f"stage {stage.index} ({stage.kind}), epoch {epoch + 1}"
                        raise NonFiniteError(f"{where}, step {self.state.global_step + 1}: {exc}") from None
                    if not acc.sync_gradients:
                        continue  # a micro-batch of gradient accumulation: no optimizer step yet
                    self.state.global_step += 1
                    if self.state.global_step % cfg.train.log_every == 0:
                        values = {k: v.item() for k, v in terms.items()}
                        values["loss"] = loss.item()
                        bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['loss_ce']:.3f}")
                        self.log({f"train/{k}": v for k, v in values.items()}, self.state.global_step)
                        self.log({"train/lr": sched.get_last_lr()[0]}, self.state.global_step)
                    if every and self.state.global_step % every == 0:
                        partial = {"stage": stage.index, "epoch": epoch, "batch": batch + 1}
                        self._save(stage.index, pruner, step=self.state.global_step, partial=partial)
        return student_p

    def run_aip(self, resume: Path | None = None, branch: Path | None = None) -> dict[str, Any]:
        """`mode: aip`: prune interval by interval, recovering with adversarial distillation; report and export."""
        acc, cfg = self.accelerator, self.cfg
        self._check_taps()
        source = resume or branch
        source_run = source.parent.parent if source is not None else None
        if branch is not None and self.main:
            copy_teacher(source_run, self.run_dir)
        acc.wait_for_everyone()
        teacher = self.teacher(source_run)
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        disc = self._discriminator()
        example = self.example.to(acc.device)
        pruner = ChannelPruner(student, example, [classifier_of(student)], cfg.prune.max_layer_ratio)
        taps = self._taps(student)
        base = self.cost(student)
        metric = "flops" if cfg.prune.target_flops_ratio is not None else "params"
        stages = plan_stages(cfg)
        val = acc.prepare_data_loader(self.val_loader())

        partial = None
        if source is not None:
            history, meta = ckpt.read(source)
            pruner.replay(history)
            self.state = RunState(**meta["state"])
            partial = meta.get("partial") if resume is not None else None
            if branch is not None:  # weights only; a new run with its own schedule from the next stage on
                student.load_state_dict(load_file(str(source / ckpt.STATE_DIR / "model.safetensors")))
                self.state.global_step = 0
            self.print(f"{'resumed' if resume else 'branched'} from {source} after stage {self.state.stage}")
        ended = resume if resume is not None and partial is None and self.state.stage >= stages[-1].index else None
        if not self.state.teacher:
            top1, top5 = self.evaluate(teacher, val)
            self.state.teacher = {**base, "top1": top1, "top5": top5}
        self._apply_capacity(student, pruner)

        if resume is not None and partial is None:
            self._restore(source, student, disc, next((s.epochs for s in stages if s.index == self.state.stage), 1))

        for stage in stages:
            if stage.index <= self.state.stage:
                continue
            self._seed(stage.index, -1)
            student = acc.unwrap_model(student)
            resuming_here = partial is not None and partial["stage"] == stage.index
            if stage.target is not None and not resuming_here:
                started = time.perf_counter()
                reached = (1.0 - pruner.cost(metric) / base[metric]) / (1.0 - target_ratio(cfg))
                criterion = criterion_for_interval(cfg.prune, stage.index, reached)
                importance = create_importance(criterion, cfg.prune)
                calibrate = self._calibrate(stage.index)
                if criterion == "activation" and cfg.prune.activation.mode == "threshold":
                    floor = target_ratio(cfg) * base[metric]
                    log = pruner.prune_below(cfg.prune.activation.threshold, floor, metric, importance, calibrate)
                    goal = f"channels under {cfg.prune.activation.threshold} of their layer's 0.9-quantile, floor "
                    goal += f"{target_ratio(cfg):.3f}"
                else:
                    log = pruner.prune_to(stage.target * base[metric], metric, importance, calibrate)
                    goal = f"target {stage.target:.3f}"
                digests = self._check_same_architecture(student, stage.index)
                entry = {
                    "stage": stage.index,
                    "criterion": criterion,
                    "metric": metric,
                    "ratio_before": log.cost_before / base[metric],
                    "ratio_after": log.cost_after / base[metric],
                    "target_ratio": log.target / base[metric],
                    "steps": log.steps,
                    "seconds": time.perf_counter() - started,
                    "widths": log.widths_after,
                    "architecture_per_process": digests,
                    "unpruned_groups": dict(pruner.refused),
                }
                self.state.pruning_log.append(entry)
                self.print(
                    f"stage {stage.index}: pruned ({criterion}) {metric} "
                    f"{entry['ratio_before']:.3f} -> {entry['ratio_after']:.3f} of the teacher ({goal})"
                    + (f"; {len(pruner.refused)} group(s) left unpruned (pruning_log.json)" if pruner.refused else "")
                )
            prepared_student = self._recover(
                stage,
                student,
                teacher,
                disc,
                taps,
                pruner,
                restore=source if resuming_here else None,
                start=(partial["epoch"], partial["batch"]) if resuming_here else (0, 0),
            )
            self._end_stage(stage, prepared_student, val, base, pruner)

        return self._finish(student, finished=ended)

    def _discriminator(self) -> nn.Module:
        """A fresh discriminator initialised from a seed of its own, not from the global stream (whose state depends
        on whether the teacher was just trained or loaded), so that a restarted run builds the same one."""
        cfg = self.cfg
        with seeded(derive_seed(cfg.seed, "discriminator")):
            disc = Discriminator(self.data.num_classes, cfg.disc.hidden, cfg.disc.input)
        return disc.to(self.accelerator.device)

    def _restore(self, source: Path, student: nn.Module, disc: nn.Module, epochs: int) -> None:
        """Weights, optimizer and RNG states of the stage-end checkpoint `source`, through Accelerate."""
        acc = self.accelerator
        acc.free_memory()
        acc.prepare(student, disc, *self._stage_optimizers(student, disc, epochs))
        acc.load_state(str(source / ckpt.STATE_DIR))

    def _end_stage(
        self, stage: Stage, student: nn.Module, val: DataLoader, base: dict[str, int], pruner: ChannelPruner
    ) -> None:
        """Evaluate the recovered student, add its row to the table, log it and checkpoint the stage."""
        top1, top5 = self.evaluate(student, val)
        row = {"stage": stage.index, "kind": stage.kind, **self.cost(student), "top1": top1, "top5": top5}
        self.state.rows.append(row)
        self.state.stage = stage.index
        self.log({"stage/top1": top1, "stage/top5": top5, "stage/params": row["params"]}, stage.index)
        self.log({"stage/flops": row["flops"]}, stage.index)
        self.print(
            f"stage {stage.index} ({stage.kind}): top-1 {top1:.2f}  top-5 {top5:.2f}  "
            f"FLOPs {row['flops'] / base['flops']:.3f}  params {row['params'] / base['params']:.3f}"
        )
        self._save(stage.index, pruner)

    def _finish(self, student: nn.Module, finished: Path | None = None) -> dict[str, Any]:
        """Export the pruned student (fp32, no autocast wrapper), then write the stage table and the pruning log.

        `finished`: the last stage checkpoint of a run that had ended before this resume; its exports are then only
        repaired, from that checkpoint's weights without training, where missing or not loading."""
        acc = self.accelerator
        student = acc.unwrap_model(student, keep_fp32_wrapper=False)
        acc.free_memory()
        if finished is None:
            check_modules(EXPORT_FILE, [student], acc)
        if self.main:
            if finished is not None:
                student.load_state_dict(load_file(str(finished / ckpt.STATE_DIR / "model.safetensors")))
            # Every configured format; one that fails is a warning, never a crash at the end of a long run.
            formats, repair = self.cfg.export.formats, finished is not None
            written = write_exports(student, self.example, self.run_dir, formats, only_stale=repair)
            if repair and written:
                names = ", ".join(EXPORT_FILES[f] for f in written)
                self.print(f"{names} missing or damaged in {self.run_dir}: exported again from {finished}")
            table = write_report(self.run_dir, self.state.teacher, self.state.rows)
            (self.run_dir / "pruning_log.json").write_text(json.dumps(self.state.pruning_log, indent=1))
            self.print(f"\n{table}\n\nrun directory: {self.run_dir}")
        acc.wait_for_everyone()
        if self.writer is not None:
            self.writer.close()
        return {"teacher": self.state.teacher, "stages": self.state.rows}

    # ------------------------------------------------------------------- ACP
    def run_acp(self, resume: Path | None = None) -> dict[str, Any]:
        """`mode: acp`: cluster channels, search per-group widths with a particle swarm under the budget,
        materialise the best structure with Torch-Pruning, recover it (AIP losses or plain fine-tuning).

        A resumed run goes on as `run_aip` does: the architecture is replayed from the checkpoint's history, and the
        weights, optimizer and RNG states come back from its stage-end or mid-stage checkpoint."""
        acc, cfg = self.accelerator, self.cfg
        self._check_taps()
        teacher = self.teacher(resume.parent.parent if resume is not None else None)
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        disc = self._discriminator()
        pruner = ChannelPruner(
            student, self.example.to(acc.device), [classifier_of(student)], cfg.prune.max_layer_ratio
        )
        base = self.cost(student)
        metric = "flops" if cfg.prune.target_flops_ratio is not None else "params"
        val = acc.prepare_data_loader(self.val_loader())
        stage = Stage(1, "acp", cfg.prune.finetune_epochs, target_ratio(cfg))
        partial = None
        if resume is not None:
            history, meta = ckpt.read(resume)
            pruner.replay(history)
            self.state = RunState(**meta["state"])
            partial = meta.get("partial")
            self.print(f"resumed from {resume} after stage {self.state.stage}")
        ended = resume if resume is not None and partial is None and self.state.stage >= stage.index else None
        if not self.state.teacher:
            top1, top5 = self.evaluate(teacher, val)
            self.state.teacher = {**base, "top1": top1, "top5": top5}
        if resume is not None and partial is None:
            self._restore(resume, student, disc, stage.epochs)
        if self.state.stage < stage.index:
            if partial is None:
                self._acp_prune(teacher, pruner, base, metric)
            plain = LossConfig(WeightedLoss(1.0), KDLoss(weight=0.0), WeightedLoss(0.0), WeightedLoss(0.0))
            losses = plain if cfg.acp.final == "finetune" else None
            restore, start = (resume, (partial["epoch"], partial["batch"])) if partial else (None, (0, 0))
            taps = self._taps(student)
            prepared = self._recover(
                stage, student, teacher, disc, taps, pruner, restore=restore, start=start, losses=losses
            )
            self._end_stage(stage, prepared, val, base, pruner)
        return self._finish(student, finished=ended)

    def _acp_prune(self, teacher: nn.Module, pruner: ChannelPruner, base: dict[str, int], metric: str) -> None:
        """Search the widths (every process scores its share of the candidates), cut the student to them, log it."""
        acc, cfg = self.accelerator, self.cfg
        started = time.perf_counter()
        data = split_search_data(self.data, cfg.acp.holdout_size, cfg.seed)
        widths, evaluations = self._acp_search(teacher, pruner, base[metric] * target_ratio(cfg), metric, data)
        box = [widths]
        if acc.num_processes > 1:  # every process ran the same swarm on the same scores; rank 0's result decides
            broadcast_object_list(box)
        cut_to_widths(pruner, box[0], cfg.prune, data.calibration, cfg.data.batch_size, acc.device)
        counts = acc.gather(torch.tensor([evaluations], device=acc.device)).tolist()
        self.state.pruning_log.append(
            {
                "stage": 1,
                "criterion": "acp",
                "metric": metric,
                "ratio_after": pruner.cost(metric) / base[metric],
                "target_ratio": target_ratio(cfg),
                "seconds": time.perf_counter() - started,
                "widths": pruner.widths(),
                "evaluations_per_process": counts,
                "architecture_per_process": self._check_same_architecture(pruner.model, 1),
            }
        )

    def _acp_search(
        self, teacher: nn.Module, pruner: ChannelPruner, budget: float, metric: str, data: SearchData
    ) -> tuple[dict[str, int], int]:
        """Clustering start, then the particle swarm; the swarm is saved after every iteration and resumed.
        Returns the best widths and how many candidates this process scored.

        Every process runs the same swarm: each scores its share of an iteration's candidates and all gather the
        scores, so the search takes 1/N of the time on N processes and no process idles in a collective."""
        from aip.prune.widths import WidthCost
        from aip.search.acp import ParticleSwarm, cluster_channels, scale_to_budget

        acc, cfg, acp = self.accelerator, self.cfg, self.cfg.acp
        names = list(pruner.widths())
        upper = [pruner.original_widths[n] for n in names]
        lower = [pruner.min_width(n) for n in names]
        width_cost = WidthCost(pruner)

        def cost(widths: list[int]) -> float:
            return width_cost.of(dict(zip(names, widths, strict=True)), metric)

        count, batch = acp.calibration_images, cfg.data.eval_batch_size
        responses = channel_responses(pruner.model, pruner.root_modules(), data.calibration, count, batch, acc.device)
        start = []
        for name, lo, hi in zip(names, lower, upper, strict=True):
            width, _ = cluster_channels(responses[name], acp.eps, acp.min_samples)
            start.append(min(hi, max(lo, width)))
        if acc.num_processes > 1:  # one starting point for every process's swarm, whatever its float rounding
            box = [start]
            broadcast_object_list(box)
            start = box[0]
        self.print(
            f"acp: clustering keeps {sum(start)}/{sum(upper)} channels, {metric} {cost(start) / cost(upper):.3f}"
        )
        example = self.example.to(acc.device)
        evaluations = [0]

        def score(widths: list[int]) -> float:
            top1 = recovered_top1(cfg, teacher, dict(zip(names, widths, strict=True)), example, data)
            return top1 / 100.0 - acp.swarm.penalty * max(0.0, cost(widths) / budget - 1.0)

        def evaluate_many(candidates: list[list[int]]) -> list[float]:
            scores, mine = spread(acc, score, candidates)
            evaluations[0] += mine
            return scores

        def report(state: Any) -> None:
            best = [int(w) for w in state.global_best]
            self.log({"acp/best_fitness": state.global_fitness}, state.iteration)
            self.print(
                f"acp iteration {state.iteration}/{acp.swarm.iterations}: best fitness {state.global_fitness:.4f}, "
                f"{metric} {cost(best) / cost(upper):.3f}, widths {best}"
            )

        search = {k: v for k, v in acp.__dict__.items() if k != "timeout_minutes"}  # what changes the result
        key = hashlib.sha256(json.dumps([cfg.model.name, cfg.seed, budget, search], default=str).encode())
        swarm = ParticleSwarm(
            lower,
            upper,
            None,
            lambda w: scale_to_budget(w, lower, cost, budget),
            acp.swarm,
            seed=cfg.seed,
            state_path=self.run_dir / "acp_swarm.json",
            key=key.hexdigest()[:16],
            evaluate_many=evaluate_many,
            write=self.main,
        )
        best = swarm.run(start, report)
        return dict(zip(names, best, strict=True)), evaluations[0]

    def _check_taps(self) -> None:
        """`model.taps` must name modules of the configured model: checked before any training, with close names."""
        taps = self.cfg.model.taps
        if not taps or self.cfg.loss.at.weight == 0:
            return
        names = [n for n, _ in self.new_model().named_modules() if n]
        missing = [t for t in taps if t not in names]
        if missing:
            close = sorted({c for t in missing for c in difflib.get_close_matches(t, names, n=4, cutoff=0.6)})
            hint = f"close names: {', '.join(close)}" if close else f"its modules include: {', '.join(names[:12])}"
            raise ConfigError(
                f"model.taps: {self.cfg.model.name} has no module {', '.join(map(repr, missing))}; {hint}"
            )

    def _taps(self, student: nn.Module) -> list[str]:
        """Modules tapped for attention transfer; none when its weight is 0 (so any model works without it)."""
        if self.cfg.loss.at.weight == 0:
            return []
        return self.cfg.model.taps or default_taps(student, self.cfg.model.name)

    def _apply_capacity(self, student: nn.Module, pruner: ChannelPruner) -> None:
        """With `prune.capacity.enabled`: estimate each group's maximum prunable ratio once, on the unpruned student
        (kept in the run state, so a resumed run uses the same caps), and hand the caps to the pruner."""
        cap = self.cfg.prune.capacity
        if not cap.enabled:
            return
        if not self.state.capacity:
            found = estimate_capacity(
                student, pruner.root_modules(), self._calibrate(0, cap.batches), tau=cap.tau, safety=cap.safety
            )
            self.state.capacity = {name: c.__dict__ for name, c in found.items()}
            self.print(
                "capacity: "
                + ", ".join(f"{n} {c.effective_rank}/{c.width} -> max {c.max_ratio:.2f}" for n, c in found.items())
            )
        caps = {name: LayerCapacity(**c) for name, c in self.state.capacity.items()}
        order = {n: c.redundancy for n, c in caps.items()} if cap.mode == "hierarchical" else None
        pruner.set_capacity({n: c.max_ratio for n, c in caps.items()}, order)

    def _stage_optimizers(self, student: nn.Module, disc: nn.Module, epochs: int) -> list[Any]:
        """Fresh student and discriminator optimizers and the student's lr schedule for a stage of `epochs`."""
        cfg = self.cfg
        opt_s = self._optimizer(student)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=(cfg.disc.beta1, cfg.disc.beta2))
        sched = self._scheduler(opt_s, self._steps_per_epoch(self.train_loader()) * max(epochs, 1))
        return [opt_s, opt_d, sched]

    def _save(
        self, stage: int, pruner: ChannelPruner, step: int | None = None, partial: dict[str, int] | None = None
    ) -> None:
        """Checkpoint the end of `stage` or, with `step` and `partial`, a point inside it; rank 0 writes the files.

        A write that fails (a full disk, say) leaves no temporary behind and stops the run with one line; the
        checkpoints committed before stay valid. Weights that hold a NaN or an infinity are never written."""
        acc = self.accelerator
        what = f"checkpoint {ckpt.stage_dir(self.run_dir, stage, step).name}"
        check_modules(what, acc._models, acc)  # the models save_state writes: the student and the discriminator
        try:
            tmp = ckpt.begin(self.run_dir, stage, step) if self.main else None
            acc.wait_for_everyone()
            acc.save_state(str(ckpt.temporary(self.run_dir, stage, step) / ckpt.STATE_DIR))
            acc.wait_for_everyone()
            if self.main:
                meta = {"stage": stage, "state": self.state.__dict__, "config": self.cfg.to_dict()}
                if partial is not None:
                    meta["partial"] = partial
                ckpt.commit(tmp, self.run_dir, stage, pruner.history(), meta, step)
                ckpt.prune_old(self.run_dir, self.cfg.checkpoint.keep)
        except Exception as exc:
            if self.main:
                error = ckpt.failed_write(self.run_dir, stage, step, exc)
                if ckpt.is_write_failure(exc):
                    raise error from None
            raise
        acc.wait_for_everyone()


def copy_teacher(source_run: Path, run_dir: Path) -> None:
    """Give a branched run its own copy of the source run's teacher, so it stands alone."""
    src = source_run / TEACHER_FILE
    if src.is_file() and not (run_dir / TEACHER_FILE).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, run_dir / TEACHER_FILE)
