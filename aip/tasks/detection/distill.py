"""One AIP training step for a detector: the detector's own losses in place of cross-entropy, attention transfer on
the feature levels, KD on the head's class logits, and the adversarial game on pooled attention maps.

The discriminator sees, per feature level, the attention map (channel mean of squared activations) average-pooled to
a fixed `GRID` x `GRID` and L2-normalised, all levels concatenated: pruned FPN or backbone widths change the channel
counts of the student's levels, never this input's width. Teacher features are real, the student's fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.ssd import SSD

from aip.config import LossConfig
from aip.distill.adversarial import pooled_attention, update_discriminator
from aip.distill.attention import attention_loss
from aip.distill.features import FeatureTaps
from aip.distill.losses import adversarial_loss, kd_loss
from aip.guards import check_losses


def has_dense_head(detector: nn.Module) -> bool:
    """SSD and RetinaNet score a fixed set of anchors: teacher and student class logits correspond one to one."""
    return isinstance(detector, (SSD, RetinaNet))


@torch.no_grad()
def teacher_forward(teacher: nn.Module, images: list[torch.Tensor]) -> torch.Tensor | None:
    """The frozen teacher's transform and backbone (its taps fill) and, for a dense head, its class logits
    (N, anchors, classes); no anchors, matching or post-processing. A detector without torchvision's transform and
    backbone runs whole, in eval mode (its taps fill; no KD)."""
    if not (hasattr(teacher, "transform") and hasattr(teacher, "backbone")):  # a detector of its own making
        teacher(images)
        return None
    batch, _ = teacher.transform(images)
    features = teacher.backbone(batch.tensors)
    if not has_dense_head(teacher):
        return None
    levels = [features] if isinstance(features, torch.Tensor) else list(features.values())
    return teacher.head(levels)["cls_logits"]


@dataclass
class DetectionDistillStep:
    """DistillStep's counterpart for detectors: `(images, targets)` in, `(loss, terms)` out; every term logged.

    Use as a context manager: it hooks the student's head to read its class logits (KD; SSD and RetinaNet only,
    where anchors correspond; other detectors log loss_kd = 0)."""

    accelerator: Accelerator
    teacher: nn.Module
    student: nn.Module  # prepared
    disc: nn.Module  # prepared
    disc_raw: nn.Module
    opt_s: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched: Any
    t_taps: FeatureTaps
    s_taps: FeatureTaps
    losses: LossConfig
    disc_steps: int = 1
    _head: dict[str, torch.Tensor] = field(default_factory=dict)
    _hook: Any = None

    def __enter__(self) -> DetectionDistillStep:
        raw = self.accelerator.unwrap_model(self.student)
        if has_dense_head(raw):

            def keep(_m: nn.Module, _i: Any, out: dict[str, torch.Tensor]) -> None:
                self._head["cls_logits"] = out["cls_logits"]

            self._hook = raw.head.register_forward_hook(keep)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._head.clear()

    def __call__(self, images: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acc, w = self.accelerator, self.losses
        use_adv = w.adv.weight > 0
        zero = images[0].new_zeros((), dtype=torch.float32)
        with torch.no_grad(), acc.autocast():
            t_logits = teacher_forward(self.teacher, images)
        t_feats = list(self.t_taps.outputs)
        with acc.accumulate(self.student, self.disc):
            det_losses = self.student(images, targets)
            s_feats = list(self.s_taps.outputs)
            s_logits = self._head.pop("cls_logits", None)
            terms: dict[str, torch.Tensor] = {}
            if use_adv:
                real, fake = pooled_attention(t_feats), pooled_attention(s_feats)
                terms["loss_d"] = update_discriminator(acc, self.disc, self.opt_d, real, fake, self.disc_steps)
            terms["loss_det"] = sum(det_losses.values(), zero)
            terms.update({f"loss_det_{k}": v.detach() for k, v in det_losses.items()})
            kd = w.kd.weight > 0 and s_logits is not None and t_logits is not None
            terms["loss_kd"] = (
                kd_loss(s_logits.float().flatten(0, 1), t_logits.float().flatten(0, 1), w.kd.temperature, w.kd.kind)
                if kd
                else zero
            )
            terms["loss_at"] = attention_loss(s_feats, t_feats) if w.at.weight > 0 else zero
            loss = w.ce.weight * terms["loss_det"] + w.kd.weight * terms["loss_kd"] + w.at.weight * terms["loss_at"]
            if use_adv:
                self.disc_raw.requires_grad_(False)
                terms["loss_adv"] = adversarial_loss(self.disc_raw(pooled_attention(s_feats)))
                self.disc_raw.requires_grad_(True)
                loss = loss + w.adv.weight * terms["loss_adv"]
            acc.backward(loss)
            check_losses({**terms, "loss": loss}, acc)
            self.opt_s.step()
            self.sched.step()
            self.opt_s.zero_grad(set_to_none=True)
        return loss, terms
