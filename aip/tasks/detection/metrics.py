"""Detection quality: COCO-style mAP@[.5:.95] and mAP@.5, through torchmetrics' MeanAveragePrecision (pycocotools).

Targets may carry `iscrowd` flags (crowd or difficult objects): detections on them count neither way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

Detections = dict[str, torch.Tensor]
Record = tuple[Detections, Detections]  # (prediction, target) of one image
Gather = Callable[[list[Record]], list[Record]]


def _cpu(d: dict[str, torch.Tensor], keys: tuple[str, ...]) -> Detections:
    return {k: d[k].detach().cpu().as_subclass(torch.Tensor) for k in keys if k in d}


def mean_average_precision(records: Iterable[Record]) -> dict[str, float]:
    """mAP@[.5:.95] ("map") and mAP@.5 ("map50") in percent over (prediction, target) pairs; -1 without objects."""
    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    metric.warn_on_many_detections = False  # COCO's rule: the 100 best-scored detections per image count
    for pred, target in records:
        metric.update([pred], [target])
    result = metric.compute()
    return {"map": 100.0 * float(result["map"]), "map50": 100.0 * float(result["map_50"])}


@torch.no_grad()
def evaluate_detector(
    model: nn.Module, loader: Iterable, device: torch.device | str, gather: Gather | None = None
) -> dict[str, float]:
    """mAP of `model` (a torchvision-style detector) over `loader`'s (images, targets) batches, in percent.

    `gather`, when given, is called once per batch with that batch's (prediction, target) pairs on the CPU and must
    return the pairs of every process, e.g. `lambda r: accelerator.gather_for_metrics(r, use_gather_object=True)`.
    The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    records: list[Record] = []
    try:
        for images, targets in loader:
            preds = model([image.to(device) for image in images])
            batch = [
                (_cpu(p, ("boxes", "scores", "labels")), _cpu(t, ("boxes", "labels", "iscrowd")))
                for p, t in zip(preds, targets, strict=True)
            ]
            records.extend(gather(batch) if gather is not None else batch)
    finally:
        model.train(was_training)
    return mean_average_precision(records)
