"""`mode: aip`: prune interval by interval towards the FLOPs (or parameter) target, recovering each stage by
adversarial distillation from the frozen teacher; then the report and the export."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from torch import nn

from aip import checkpoint as ckpt
from aip.accel import plain_forward, strip_autocast
from aip.methods.processes import calibration, check_same_architecture, on_main
from aip.methods.pruning import PruningRun, plan_stages, start_pruning, target_ratio, timing_batch
from aip.methods.recovery import Stage, end_stage
from aip.prune.capacity import LayerCapacity, estimate_capacity
from aip.prune.importance import create_importance, prune_threshold
from aip.prune.latency import LatencyTable, LayerCurve, layer_curves, layer_times, relative_latency
from aip.prune.pruner import ChannelPruner
from aip.prune.schedule import criterion_for_interval
from aip.pruned import load_pruned
from aip.session import Outcome, Session


def latency_ms(session: Session, model: nn.Module, teacher: nn.Module, teacher_ms: float) -> float:
    """The model's latency in milliseconds at data.batch_size on the run's device (eval mode, median of repeats):
    its ratio to the teacher's, the two timed in turns, times the teacher's latency measured at the start."""
    inputs, student = timing_batch(session), session.accelerator.unwrap_model(model)
    with plain_forward(student):  # the teacher is never prepared: both are timed in their own (fp32) precision
        return teacher_ms * on_main(session, lambda: relative_latency(student, teacher, inputs))


def latency_table(
    session: Session, pruner: ChannelPruner, curves: dict[nn.Module, LayerCurve | None], total: float
) -> LatencyTable:
    """The per-group price of a channel in milliseconds, from layer times measured on the student as it is now
    (whose whole forward was just measured at `total` ms) and each layer's latency curve, measured alone at a few
    widths on the first call (kept in `curves`)."""
    table, inputs = pruner.width_cost(), timing_batch(session)
    layers = [layer.module for layer in table.layers]
    missing = [m for m in layers if m not in curves]
    if missing:
        curves.update(zip(missing, on_main(session, lambda: layer_curves(pruner.model, missing, inputs)), strict=True))
    times = on_main(session, lambda: layer_times(pruner.model, layers, inputs))
    return LatencyTable(table, times, total, [curves[m] for m in layers])


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
    criterion = criterion_for_interval(cfg.prune, stage.interval or stage.index, reached)
    importance = create_importance(criterion, cfg.prune)
    calibrate = calibration(session, stage.index)
    threshold = prune_threshold(importance)  # a criterion that removes what falls under a fixed level
    if threshold is not None:
        floor = target_ratio(cfg) * base[metric]
        log = pruner.prune_below(threshold, floor, metric, importance, calibrate)
        goal = f"channels under {threshold} of their layer's 0.9-quantile, floor "
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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that teaches: eval mode, no gradients, no autocast wrapper."""
    return strip_autocast(copy.deepcopy(model)).eval().requires_grad_(False)


def stage_teacher(run: PruningRun, stage: Stage, assistant: nn.Module | None) -> nn.Module:
    """Who teaches `stage`: the frozen teacher, or under `loss.teacher: assistant` (from the second stage on) the
    student as the previous stage left it: `assistant`, taken before this stage's prune, or for a run resumed inside
    this stage the previous stage's checkpoint."""
    session = run.session
    if session.cfg.loss.teacher != "assistant" or stage.index == 1:
        return run.teacher
    if assistant is None:
        previous = ckpt.stage_dir(session.run_dir, stage.index - 1)
        if not previous.is_dir():
            raise ckpt.CheckpointError(
                f"loss.teacher assistant: resuming inside stage {stage.index} needs the teacher assistant of stage "
                f"{stage.index - 1}, whose checkpoint {previous.name} is gone (checkpoint.keep); resume from a stage "
                "end"
            )
        assistant = frozen_copy(load_pruned(previous, session.model)).to(session.accelerator.device)
    return assistant


def run_aip(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """`mode: aip`: prune interval by interval, recovering with adversarial distillation; report and export."""
    run = start_pruning(session, resume, branch)
    stages = plan_stages(session.cfg)
    curves: dict[nn.Module, LayerCurve | None] = {}  # each layer's latency against its widths, measured once
    apply_capacity(session, run.student, run.pruner)
    run.begin(stages)
    for stage in stages:
        if stage.index <= session.state.stage:
            continue
        session.seed(stage.index, -1)
        run.student = session.accelerator.unwrap_model(run.student)
        assistant = None
        if session.cfg.loss.teacher == "assistant" and stage.index > 1 and not run.resuming_in(stage):
            assistant = frozen_copy(run.student)  # the student as the previous stage left it, before this prune
        if stage.target is not None and not run.resuming_in(stage):
            with plain_forward(run.student):  # ranked, verified and timed in fp32, as the teacher and the export are
                prune_stage(session, stage, run.pruner, run.base, run.metric, run.teacher, curves)
        prepared = run.recover(stage, teacher=stage_teacher(run, stage, assistant))
        latency = None
        if run.metric == "latency":
            latency = lambda m: latency_ms(session, m, run.teacher, run.base["latency"])  # noqa: E731
        end_stage(session, stage, prepared, run.val, run.base, run.pruner, latency)
    return run.finish()
