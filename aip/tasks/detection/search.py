"""What ACP's width search needs of a detector (`DetectionSearch`): training images whose augmentation ignores the
run's epoch, a candidate's short-recovery loss (the detector's own losses, KD on a dense head's class logits under
acp.distill), the prunable view's inputs and mAP@.5 as the held-out score."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from aip.data import eval_view
from aip.distill.losses import kd_loss
from aip.tasks.base import SearchAdapter
from aip.tasks.detection.distill import has_dense_head, teacher_forward
from aip.tasks.detection.metrics import evaluate_detector

if TYPE_CHECKING:
    from aip.config import Config


def fixed_epoch(dataset: Dataset) -> Dataset:
    """A shallow copy of `dataset` whose seeded augmentation stays at epoch 0 whatever the run sets on the original,
    so that a candidate trains on the same images in a fresh, a resumed or a distributed run."""
    transform = getattr(dataset, "transform", None)
    if not callable(getattr(transform, "set_epoch", None)):
        return dataset
    view = copy.copy(dataset)
    view.transform = copy.copy(transform)  # type: ignore[attr-defined]
    view.transform.set_epoch(0)  # type: ignore[attr-defined]
    return view


def recovery_loss(
    model: nn.Module, teacher: nn.Module, images: list[torch.Tensor], targets: list[dict], cfg: Config
) -> torch.Tensor:
    """The detector's losses; under acp.distill weighted as classification weighs CE, plus KD on the class logits
    of a dense head (SSD, RetinaNet, whose anchors correspond; other detectors get no KD term)."""
    images, targets = list(images), list(targets)
    kd_on = cfg.acp.distill and cfg.loss.kd.weight > 0 and has_dense_head(model)
    head: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _i: Any, out: dict[str, torch.Tensor]) -> None:
        head["cls_logits"] = out["cls_logits"]

    hook = model.head.register_forward_hook(keep) if kd_on else None
    try:
        losses = model(images, targets)
    finally:
        if hook is not None:
            hook.remove()
    loss = sum(losses.values(), images[0].new_zeros((), dtype=torch.float32))
    if not cfg.acp.distill:
        return loss
    loss = cfg.loss.ce.weight * loss
    if kd_on:
        student, t_logits = head["cls_logits"].float().flatten(0, 1), teacher_forward(teacher, images)
        kd = kd_loss(student, t_logits.float().flatten(0, 1), cfg.loss.kd.temperature, cfg.loss.kd.kind)
        loss = loss + cfg.loss.kd.weight * kd
    return loss


class DetectionSearch(SearchAdapter):
    """ACP on a detector: fixed-epoch training images, the detector's losses, mAP@.5 of the held-out images."""

    def search_sets(self, data: Any) -> tuple[Dataset, Dataset]:
        return fixed_epoch(data.train), eval_view(data.train, data.val)

    def view_inputs(self, view: nn.Module, x: Any, device: torch.device) -> torch.Tensor:
        return view.batch([image.to(device) for image in x])

    def recovery_loss(self, model: nn.Module, teacher: nn.Module, x: Any, y: Any, cfg: Config) -> torch.Tensor:
        return recovery_loss(model, teacher, x, y, cfg)

    def holdout_score(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """mAP@.5 (%)."""
        return evaluate_detector(model, loader, device)["map50"]
