"""One AIP training step for a detector: the detector's own losses in place of cross-entropy, attention transfer on
the feature levels, KD on the head's class logits, and the adversarial game on pooled attention maps.

The discriminator sees, per feature level, the attention map (channel mean of squared activations) average-pooled to
a fixed `GRID` x `GRID` and L2-normalised, all levels concatenated: pruned FPN or backbone widths change the channel
counts of the student's levels, never this input's width. Teacher features are real, the student's fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.ssd import SSD

from aip.distill.losses import kd_loss
from aip.distill.step import DistillStepBase


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
class DetectionDistillStep(DistillStepBase):
    """Detection's step: `(images, targets)` in, `(loss, terms)` out; every term of the detector's losses logged.
    The discriminator always judges the taps' pooled attention maps (the base's inputs).

    Use as a context manager: it hooks the student's head to read its class logits (KD; SSD and RetinaNet only,
    where anchors correspond; other detectors log loss_kd = 0)."""

    task_key: ClassVar[str] = "loss_det"
    _head: dict[str, torch.Tensor] = field(default_factory=dict)
    _hook: Any = None

    def __enter__(self) -> DetectionDistillStep:
        raw = self.parts.accelerator.unwrap_model(self.parts.student)
        if has_dense_head(raw):

            def keep(_m: nn.Module, _i: Any, out: dict[str, torch.Tensor]) -> None:
                self._head["cls_logits"] = out["cls_logits"]

            self._hook = raw.head.register_forward_hook(keep)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._head.clear()

    def zero(self, images: list[torch.Tensor]) -> torch.Tensor:
        return images[0].new_zeros((), dtype=torch.float32)

    def teacher_out(self, images: list[torch.Tensor]) -> torch.Tensor | None:
        return teacher_forward(self.parts.teacher, images)

    def student_out(
        self, images: list[torch.Tensor], targets: list[dict]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The detector's losses and, through the head's hook, its class logits (None without a dense head)."""
        return self.parts.student(images, targets), self._head.pop("cls_logits", None)

    def task_terms(
        self,
        targets: list[dict],
        t_out: torch.Tensor | None,
        s_out: tuple[dict[str, torch.Tensor], torch.Tensor | None],
        zero: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        w = self.losses
        det_losses, s_logits = s_out
        terms = {"loss_det": sum(det_losses.values(), zero)}
        terms.update({f"loss_det_{k}": v.detach() for k, v in det_losses.items()})
        kd = w.kd.weight > 0 and s_logits is not None and t_out is not None
        terms["loss_kd"] = (
            kd_loss(s_logits.float().flatten(0, 1), t_out.float().flatten(0, 1), w.kd.temperature, w.kd.kind)
            if kd
            else zero
        )
        return terms
