"""Detection as a task of the trainer: detection data with list collation, detectors, their prunable view, the
detector's own losses, mAP, pooled-attention features for the discriminator and the export with a loader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn

from aip.distill.adversarial import GRID
from aip.prune.cost import model_cost
from aip.tasks.base import ExportTarget, Task
from aip.tasks.detection.datasets import build_detection_data, check_detection_data, check_train_size
from aip.tasks.detection.distill import DetectionDistillStep
from aip.tasks.detection.export import write_detection_exports
from aip.tasks.detection.metrics import evaluate_detector
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.prunable import PrunableDetector, head_layers
from aip.tasks.detection.search import DetectionSearch
from aip.tasks.detection.taps import detection_taps
from aip.tasks.detection.transforms import collate

if TYPE_CHECKING:
    from aip.config import Config, LossConfig
    from aip.distill.step import StepParts

SYNTHETIC_KEYS = ("num_classes", "train_size", "val_size")  # data.* keys the synthetic set takes as its options


def build_data(cfg: Config) -> Any:
    """The configured detection data set: data.options, for synthetic data.num_classes/train_size/val_size, and
    data.train_subset; what it cannot honour (`check_detection_data`, a training set under one batch) is refused."""
    d = cfg.data
    check_detection_data(d)
    options = dict(d.options)
    if d.name == "synthetic":
        for key in SYNTHETIC_KEYS:
            options.setdefault(key, getattr(d, key))
    data = build_detection_data(d.name, d.root, d.image_size, d.augment, cfg.seed, d.train_subset, **options)
    check_train_size(data, d)
    return data


def view_input(view: PrunableDetector, example: torch.Tensor) -> torch.Tensor:
    """The example image as the detector's transform hands it to the backbone (resized to the configured size)."""
    return view.batch([example[0]])


class DetectionTask(Task):
    """Images to boxes: torchvision-style detectors pruned through `PrunableDetector`, measured by mAP."""

    name = "detection"
    metrics = ("map", "map50")
    collate = staticmethod(collate)
    loss_key = "loss_det"
    disc_on_taps_only = True  # pooled attention maps: a width that pruned levels never change
    probes_classes = False  # a detector's output is boxes: its class count is the data's
    search = DetectionSearch()

    def build_data(self, cfg: Config) -> Any:
        return build_data(cfg)

    def example(self, data: Any) -> torch.Tensor:
        return data.train[0][0].as_subclass(torch.Tensor).unsqueeze(0)

    def create_model(self, cfg: Config, data: Any, example: torch.Tensor) -> nn.Module:
        m = cfg.model
        return create_detector(m.name, data.num_classes, cfg.data.image_size, **m.kwargs)

    def cost(self, model: nn.Module, example: torch.Tensor) -> dict[str, int]:
        view = PrunableDetector(model)
        c = model_cost(view, view_input(view, example))
        return {"params": c.params, "flops": c.flops}

    def prunable(self, model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor, list[nn.Module]]:
        view = PrunableDetector(model)
        return view, view_input(view, example), head_layers(model)

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        detector = model.detector if isinstance(model, PrunableDetector) else model
        losses = detector(list(x), list(y))
        return sum(losses.values(), torch.zeros((), device=x[0].device))

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
        def gather(records: list) -> list:
            return accelerator.gather_for_metrics(records, use_gather_object=True)

        return evaluate_detector(model, loader, accelerator.device, gather=gather)

    def describe(self, values: dict[str, float]) -> str:
        return f"mAP {values['map']:.2f}  mAP@.5 {values['map50']:.2f}"

    def default_taps(self, model: nn.Module, cfg: Config) -> list[str]:
        return detection_taps(model, cfg.data.image_size)

    def disc_features(self, num_classes: int, taps: list[str], disc_input: str) -> int:
        return max(1, len(taps)) * GRID * GRID

    def distill_step(self, parts: StepParts, losses: LossConfig, disc_steps: int = 1) -> DetectionDistillStep:
        return DetectionDistillStep(parts, losses, disc_steps)

    def set_epoch(self, data: Any, value: int) -> None:
        data.train.set_epoch(value)

    def export(self, target: ExportTarget, model: nn.Module, history: list, only_stale: bool) -> list[str]:
        return write_detection_exports(target, model, history, only_stale)
