"""One AIP training step: the discriminator's update, then the student's from CE, KD, attention transfer and the
adversarial term, under Accelerate's gradient accumulation and mixed precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass
class DistillStep:
    """One AIP training step on a batch: the discriminator learns teacher (real) from student (fake) outputs
    (`disc_steps` updates; on the logits, or on the taps' pooled attention maps when the discriminator's input is
    "attention"), then the student learns from CE, KD, attention transfer and the adversarial loss through the bare
    discriminator (its weights fixed), so DDP never reduces the discriminator's gradients in the student's backward.

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
    disc_steps: int = 1

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
            on_attention = self.disc_raw.input == "attention"
            if use_adv:
                real, fake = (
                    (pooled_attention(t_feats), pooled_attention(s_feats))
                    if on_attention
                    else (t_logits.float(), s_logits.float())
                )
                terms["loss_d"] = update_discriminator(acc, self.disc, self.opt_d, real, fake, self.disc_steps)
            terms["loss_ce"] = F.cross_entropy(s_logits.float(), y)
            terms["loss_kd"] = kd_loss(s_logits.float(), t_logits.float(), w.kd.temperature, w.kd.kind)
            terms["loss_at"] = attention_loss(s_feats, t_feats) if w.at.weight > 0 else x.new_zeros(())
            loss = w.ce.weight * terms["loss_ce"] + w.kd.weight * terms["loss_kd"] + w.at.weight * terms["loss_at"]
            if use_adv:
                self.disc_raw.requires_grad_(False)
                terms["loss_adv"] = adversarial_loss(self.disc_raw(fake))
                self.disc_raw.requires_grad_(True)
                loss = loss + w.adv.weight * terms["loss_adv"]
            acc.backward(loss)
            check_losses({**terms, "loss": loss}, acc)  # before the step: a NaN never reaches the weights
            self.opt_s.step()
            self.sched.step()
            self.opt_s.zero_grad(set_to_none=True)
        return loss, terms
