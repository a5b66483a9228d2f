"""`mode: aip`: prune interval by interval towards the FLOPs (or parameter) target, recovering each stage by
adversarial distillation from the frozen teacher; then the report and the export."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from aip import checkpoint as ckpt
from aip.config import Config
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
from aip.models import classifier_of
from aip.prune.capacity import LayerCapacity, estimate_capacity
from aip.prune.importance import create_importance, criterion_for_interval
from aip.prune.pruner import ChannelPruner
from aip.prune.schedule import interval_targets
from aip.session import Outcome, RunState, Session


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


def prune_stage(session: Session, stage: Stage, pruner: ChannelPruner, base: dict[str, int], metric: str) -> None:
    """Prune the student to the stage's target with the interval's criterion, and log what was removed."""
    cfg = session.cfg
    started = time.perf_counter()
    reached = (1.0 - pruner.cost(metric) / base[metric]) / (1.0 - target_ratio(cfg))
    criterion = criterion_for_interval(cfg.prune, stage.index, reached)
    importance = create_importance(criterion, cfg.prune)
    calibrate = calibration(session, stage.index)
    if criterion == "activation" and cfg.prune.activation.mode == "threshold":
        floor = target_ratio(cfg) * base[metric]
        log = pruner.prune_below(cfg.prune.activation.threshold, floor, metric, importance, calibrate)
        goal = f"channels under {cfg.prune.activation.threshold} of their layer's 0.9-quantile, floor "
        goal += f"{target_ratio(cfg):.3f}"
    else:
        log = pruner.prune_to(stage.target * base[metric], metric, importance, calibrate)
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
    source = resume or branch
    source_run = source.parent.parent if source is not None else None
    if branch is not None and session.main:
        copy_teacher(source_run, session.run_dir)
    acc.wait_for_everyone()
    teacher = load_teacher(session, source_run)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    disc = discriminator(session)
    example = session.example.to(acc.device)
    pruner = ChannelPruner(
        student, example, [classifier_of(student)], cfg.prune.max_layer_ratio, cfg.prune.round_to or 1
    )
    taps = tap_names(session, student)
    base = session.cost(student)
    metric = "flops" if cfg.prune.target_flops_ratio is not None else "params"
    stages = plan_stages(cfg)
    val = acc.prepare_data_loader(session.val_loader())

    partial = None
    if source is not None:
        history, meta = ckpt.read(source)
        pruner.replay(history)
        session.state = RunState(**meta["state"])
        partial = meta.get("partial") if resume is not None else None
        if branch is not None:  # weights only; a new run with its own schedule from the next stage on
            student.load_state_dict(load_file(str(source / ckpt.STATE_DIR / "model.safetensors")))
            session.state.global_step = 0
        session.print(f"{'resumed' if resume else 'branched'} from {source} after stage {session.state.stage}")
    ended = resume if resume is not None and partial is None and session.state.stage >= stages[-1].index else None
    if not session.state.teacher:
        top1, top5 = session.evaluate(teacher, val)
        session.state.teacher = {**base, "top1": top1, "top5": top5}
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
            prune_stage(session, stage, pruner, base, metric)
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
        end_stage(session, stage, prepared_student, val, base, pruner)

    return session.finish(student, finished=ended)
