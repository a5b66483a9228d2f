"""One AIP training step: the discriminator's update, then the student's from the task loss, KD, attention transfer
and the adversarial term, under Accelerate's gradient accumulation and mixed precision.

`DistillStepBase` owns what every task shares (the order of the passes, the discriminator's update, the adversarial
term, the loss sum, backward, the finite check and the optimizer and scheduler steps); a task's step overrides the
hooks for what differs: the teacher's and the student's forward, the task-loss terms with KD, the discriminator's
inputs and the zero tensor. `DistillStep` is classification's; detection's is `aip.tasks.detection.distill`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from aip.config import LossConfig
from aip.distill.adversarial import pooled_attention, update_discriminator
from aip.distill.attention import attention_loss
from aip.distill.features import FeatureTaps
from aip.distill.losses import adversarial_loss, kd_loss
from aip.guards import check_losses


@dataclass(frozen=True)
class StepParts:
    """What a step trains and reads: the models, their optimizers, the student's schedule and the feature taps."""

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
    regularize: Callable[[], None] | None = None  # adds a regulariser's gradient before the student's step


@dataclass
class DistillStepBase:
    """One AIP training step on a batch: the discriminator learns teacher (real) from student (fake) inputs
    (`disc_steps` updates), then the student learns from the task loss, KD, attention transfer and the adversarial
    loss through the bare discriminator (its weights fixed), so DDP never reduces the discriminator's gradients in the
    student's backward. Returns (loss, terms); a context manager (no-op here) for steps that hook the student.

    Raises NonFiniteError, before the student's optimizer steps, when a loss term is NaN or infinite."""

    parts: StepParts
    losses: LossConfig
    disc_steps: int = 1
    task_key: ClassVar[str] = "loss_ce"  # the term weighted by loss.ce.weight

    def __enter__(self) -> DistillStepBase:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def zero(self, x: Any) -> torch.Tensor:
        """The zero scalar a term that is off takes."""
        raise NotImplementedError

    def teacher_out(self, x: Any) -> Any:
        """The frozen teacher's forward (under no_grad and autocast); its taps fill."""
        raise NotImplementedError

    def student_out(self, x: Any, y: Any) -> Any:
        """The student's forward (inside the accumulation window); its taps fill."""
        raise NotImplementedError

    def disc_inputs(
        self, t_out: Any, s_out: Any, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's (real, fake) inputs: the taps' pooled attention maps, teacher and student."""
        return pooled_attention(t_feats), pooled_attention(s_feats)

    def task_terms(self, y: Any, t_out: Any, s_out: Any, zero: torch.Tensor) -> dict[str, torch.Tensor]:
        """The task loss under `task_key` (and any parts of it to log), then `loss_kd`."""
        raise NotImplementedError

    def at_weight(self) -> float:
        """Attention transfer's weight for this step: loss.at.weight, times the learning rate's share s of its value
        at the stage's start under `loss.at.schedule: lr`, 1 - s under `ramp`, or min(1, 2(1 - s)) under `warmup`
        (the scheduler's state: a resumed stage goes on alike)."""
        at = self.losses.at
        if at.schedule == "constant":
            return at.weight
        group = self.parts.opt_s.param_groups[0]
        share = group["lr"] / group.get("initial_lr", group["lr"])
        if at.schedule == "lr":
            return at.weight * share
        if at.schedule == "warmup":
            return at.weight * min(1.0, 2.0 * (1.0 - share))
        return at.weight * (1.0 - share)

    def __call__(self, x: Any, y: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, w = self.parts, self.losses
        acc = p.accelerator
        use_adv = w.adv.weight > 0
        zero = self.zero(x)
        with torch.no_grad(), acc.autocast():
            t_out = self.teacher_out(x)
        t_feats = list(p.t_taps.outputs)
        with acc.accumulate(p.student, p.disc):
            s_out = self.student_out(x, y)
            s_feats = list(p.s_taps.outputs)
            terms: dict[str, torch.Tensor] = {}
            if use_adv:
                real, fake = self.disc_inputs(t_out, s_out, t_feats, s_feats)
                terms["loss_d"] = update_discriminator(acc, p.disc, p.opt_d, real, fake, self.disc_steps)
            terms.update(self.task_terms(y, t_out, s_out, zero))
            terms["loss_at"] = attention_loss(s_feats, t_feats) if w.at.weight > 0 else zero
            at = self.at_weight()
            loss = w.ce.weight * terms[self.task_key] + w.kd.weight * terms["loss_kd"] + at * terms["loss_at"]
            if use_adv:
                p.disc_raw.requires_grad_(False)
                terms["loss_adv"] = adversarial_loss(p.disc_raw(fake))
                p.disc_raw.requires_grad_(True)
                loss = loss + w.adv.weight * terms["loss_adv"]
            acc.backward(loss)
            check_losses({**terms, "loss": loss}, acc)  # before the step: a NaN never reaches the weights
            if p.regularize is not None and acc.sync_gradients:
                acc.unscale_gradients(p.opt_s)  # under fp16 the regulariser adds to true gradients, not scaled ones
                p.regularize()
            p.opt_s.step()
            p.sched.step()
            p.opt_s.zero_grad(set_to_none=True)
        return loss, terms


@dataclass
class DistillStep(DistillStepBase):
    """Classification's step: CE and KD on the logits; the discriminator judges the logits, or the taps' pooled
    attention maps when its input is "attention"."""

    def zero(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())

    def teacher_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.teacher(x)

    def student_out(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.parts.student(x)

    def disc_inputs(
        self, t_out: Any, s_out: Any, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.parts.disc_raw.input == "attention":
            return super().disc_inputs(t_out, s_out, t_feats, s_feats)
        return t_out.float(), s_out.float()

    def task_terms(
        self, y: torch.Tensor, t_out: torch.Tensor, s_out: torch.Tensor, zero: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        kd = self.losses.kd
        return {
            "loss_ce": F.cross_entropy(s_out.float(), y),
            "loss_kd": kd_loss(s_out.float(), t_out.float(), kd.temperature, kd.kind),
        }
