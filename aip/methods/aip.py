"""`mode: aip`: prune interval by interval towards the FLOPs (or parameter) target, recovering each stage by
adversarial distillation from the frozen teacher; then the report and the export."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from aip import checkpoint as ckpt
from aip.accel import plain_forward
from aip.config import Config, ConfigError
from aip.methods.recovery import (
    Stage,
    calibration,
    check_same_architecture,
    check_taps,
    discriminator,
    end_stage,
    recover,
    restore_stage,
    tap_names,
)
from aip.methods.train import copy_teacher, load_teacher
from aip.prune.capacity import LayerCapacity, estimate_capacity
from aip.prune.importance import create_importance, criterion_for_interval
from aip.prune.latency import LatencyTable, LayerCurve, layer_curves, layer_times, measure_latency, relative_latency
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


def on_main(session: Session, measure: Callable[[], Any]) -> Any:
    """`measure()` on the main process, its result on every process (timings differ between processes, and every
    process must prune the same channels)."""
    box = [measure() if session.main else None]
    if session.accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


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


def latency_ms(session: Session, model: nn.Module, teacher: nn.Module, teacher_ms: float) -> float:
    """The model's latency in milliseconds at data.batch_size on the run's device (eval mode, median of repeats):
    its ratio to the teacher's, the two timed in turns, times the teacher's latency measured at the start."""
    inputs, student = _batch(session), session.accelerator.unwrap_model(model)
    with plain_forward(student):  # the teacher is never prepared: both are timed in their own (fp32) precision
        return teacher_ms * on_main(session, lambda: relative_latency(student, teacher, inputs))


def latency_table(
    session: Session, pruner: ChannelPruner, curves: dict[nn.Module, LayerCurve | None], total: float
) -> LatencyTable:
    """The per-group price of a channel in milliseconds, from layer times measured on the student as it is now
    (whose whole forward was just measured at `total` ms) and each layer's latency curve, measured alone at a few
    widths on the first call (kept in `curves`)."""
    table, inputs = pruner.width_cost(), _batch(session)
    layers = [layer.module for layer in table.layers]
    missing = [m for m in layers if m not in curves]
    if missing:
        curves.update(zip(missing, on_main(session, lambda: layer_curves(pruner.model, missing, inputs)), strict=True))
    times = on_main(session, lambda: layer_times(pruner.model, layers, inputs))
    return LatencyTable(table, times, total, [curves[m] for m in layers])


def _batch(session: Session) -> torch.Tensor:
    example = session.example.to(session.accelerator.device)
    return example.repeat(session.cfg.data.batch_size, *[1] * (example.dim() - 1))


def plan_stages(cfg: Config) -> list[Stage]:
    """Stages 1..S prune to the schedule's targets and recover; stage S+1 fine-tunes when finetune_epochs > 0."""
    targets = interval_targets(target_ratio(cfg), cfg.prune.intervals, cfg.prune.schedule)
    stages = [Stage(i + 1, "prune", cfg.prune.epochs_between, t) for i, t in enumerate(targets)]
    if cfg.prune.finetune_epochs > 0:
        stages.append(Stage(len(stages) + 1, "finetune", cfg.prune.finetune_epochs, None))
    return stages


def apply_capacity(session: Session, student: nn.Module, pruner: ChannelPruner) -> None:
    """With `prune.capacity.enabled`: estimate each group's maximum prunable ratio once, on the unpruned student
    (kept in the run state, so a resumed run uses the same caps), and hand the caps to the pruner."""
    cap = session.cfg.prune.capacity
    if not cap.enabled:
        return
    if not session.state.capacity:
        found = estimate_capacity(
            student, pruner.root_modules(), calibration(session, 0, cap.batches), tau=cap.tau, safety=cap.safety
        )
        session.state.capacity = {name: c.__dict__ for name, c in found.items()}
        session.print(
            "capacity: "
            + ", ".join(f"{n} {c.effective_rank}/{c.width} -> max {c.max_ratio:.2f}" for n, c in found.items())
        )
    caps = {name: LayerCapacity(**c) for name, c in session.state.capacity.items()}
    order = {n: c.redundancy for n, c in caps.items()} if cap.mode == "hierarchical" else None
    pruner.set_capacity({n: c.max_ratio for n, c in caps.items()}, order)


def prune_stage(
    session: Session,
    stage: Stage,
    pruner: ChannelPruner,
    base: dict[str, float],
    metric: str,
    teacher: nn.Module | None = None,
    curves: dict[nn.Module, LayerCurve | None] | None = None,
) -> None:
    """Prune the student to the stage's target with the interval's criterion, and log what was removed (a latency
    target measures the student against `teacher`, pricing channels with the layers' `curves`, measured once)."""
    cfg = session.cfg
    started = time.perf_counter()
    measure, pricer = None, None
    if metric == "latency":  # measured: every step measures again, with a table refreshed on the student as it is
        curves = {} if curves is None else curves
        measured: list[float] = []  # the pruner prices right after it measures: the table reuses that figure

        def measure() -> float:
            measured.append(latency_ms(session, pruner.model, teacher, base["latency"]))
            return measured[-1]

        pricer = lambda _: latency_table(session, pruner, curves, measured[-1])  # noqa: E731
    reached = (1.0 - (measure or (lambda: pruner.cost(metric)))() / base[metric]) / (1.0 - target_ratio(cfg))
    criterion = criterion_for_interval(cfg.prune, stage.index, reached)
    importance = create_importance(criterion, cfg.prune)
    calibrate = calibration(session, stage.index)
    if criterion == "activation" and cfg.prune.activation.mode == "threshold":
        floor = target_ratio(cfg) * base[metric]
        log = pruner.prune_below(cfg.prune.activation.threshold, floor, metric, importance, calibrate)
        goal = f"channels under {cfg.prune.activation.threshold} of their layer's 0.9-quantile, floor "
        goal += f"{target_ratio(cfg):.3f}"
    else:
        log = pruner.prune_to(
            stage.target * base[metric], metric, importance, calibrate, measure=measure, pricer=pricer
        )
        goal = f"target {stage.target:.3f}"
    digests = check_same_architecture(session, pruner.model, stage.index)
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
        "round_to": pruner.round_to,
        "architecture_per_process": digests,
        "unpruned_groups": dict(pruner.refused),
    }
    session.state.pruning_log.append(entry)
    session.print(
        f"stage {stage.index}: pruned ({criterion}) {metric} "
        f"{entry['ratio_before']:.3f} -> {entry['ratio_after']:.3f} of the teacher ({goal})"
        + (f"; {len(pruner.refused)} group(s) left unpruned (pruning_log.json)" if pruner.refused else "")
    )


def run_aip(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """`mode: aip`: prune interval by interval, recovering with adversarial distillation; report and export."""
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
        base["latency"] = on_main(session, lambda: measure_latency(teacher, _batch(session)))
    stages = plan_stages(cfg)
    curves: dict[nn.Module, LayerCurve | None] = {}  # each layer's latency against its widths, measured once
    val = acc.prepare_data_loader(session.val_loader())

    partial = None
    if source is not None:
        # A branch takes the weights only (a new run with its own schedule from the next stage on); a resume gets
        # them, with the optimizer and RNG states, through Accelerate (`restore_stage`, `recover`).
        restore_pruned(pruner, student, history, source if branch is not None else None)
        session.state = RunState.restored(meta["state"], round_to=session.state.round_to)
        partial = meta.get("partial") if resume is not None else None
        if branch is not None:
            session.state.global_step = 0
        session.print(f"{'resumed' if resume else 'branched'} from {source} after stage {session.state.stage}")
    ended = resume if resume is not None and partial is None and session.state.stage >= stages[-1].index else None
    if not session.state.teacher:  # the report's teacher row names its latency as the stage rows do
        row = {("latency_ms" if k == "latency" else k): v for k, v in base.items()}
        session.state.teacher = {**row, **session.metrics(teacher, val)}
    apply_capacity(session, student, pruner)

    if resume is not None and partial is None:
        epochs = next((s.epochs for s in stages if s.index == session.state.stage), 1)
        restore_stage(session, source, student, disc, epochs)

    for stage in stages:
        if stage.index <= session.state.stage:
            continue
        session.seed(stage.index, -1)
        student = acc.unwrap_model(student)
        resuming_here = partial is not None and partial["stage"] == stage.index
        if stage.target is not None and not resuming_here:
            with plain_forward(student):  # ranked, verified and timed in fp32, as the teacher and the export are
                prune_stage(session, stage, pruner, base, metric, teacher, curves)
        prepared_student = recover(
            session,
            stage,
            student,
            teacher,
            disc,
            taps,
            pruner,
            restore=source if resuming_here else None,
            start=(partial["epoch"], partial["batch"]) if resuming_here else (0, 0),
            val=val,
        )
        latency = (lambda m: latency_ms(session, m, teacher, base["latency"])) if metric == "latency" else None
        end_stage(session, stage, prepared_student, val, base, pruner, latency)

    return session.finish(student, finished=ended, history=pruner.history(), teacher=teacher)
