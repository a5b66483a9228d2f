"""Output-feature and adversarial losses between student and teacher outputs (all in stable with-logits forms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, kind: str = "kl"
) -> torch.Tensor:
    """`kl`: T^2 * KL(softmax(t/T) || softmax(s/T)) per sample (Hinton); `mse`: mean squared logit difference."""
    if kind == "kl":
        t = temperature
        return F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
    if kind == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    raise ValueError(f"unknown output-feature loss {kind!r}; known: kl, mse")


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss: teacher outputs are real (1), student outputs fake (0)."""
    real = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
    fake = F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return real + fake


def adversarial_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The student's adversarial loss: make the discriminator call its outputs real."""
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
