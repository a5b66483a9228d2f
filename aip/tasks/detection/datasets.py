"""`build_detection_data`: a registered detection data set (pennfudan, voc, coco, synthetic) with its transforms."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import aip.tasks.detection.sources  # noqa: F401  (registers pennfudan, voc, coco)
import aip.tasks.detection.synthetic  # noqa: F401  (registers synthetic)
from aip.errors import ConfigError
from aip.tasks.detection.data import DETECTION_DATASETS, DetectionData, transforms_for

_FILLED = ("root", "train_transform", "val_transform", "seed", "image_size")


def build_detection_data(
    name: str,
    root: str | Path | None = None,
    image_size: int | None = None,
    augment: bool = True,
    seed: int = 0,
    **options: Any,
) -> DetectionData:
    """The registered detection data set `name` with its transforms.

    `image_size` bounds the longer side of every image (None keeps the files' sizes; the synthetic set draws its
    images at that size); `seed` fixes the augmentation and, where the data set splits itself, the split; `options`
    are the data set's own (e.g. val_size for pennfudan, train_split for voc, num_classes for synthetic).
    """
    builder = DETECTION_DATASETS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in _FILLED]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"data: {name} has no option {', '.join(unknown)}; it takes {', '.join(accepted) or 'none'}")
    if "image_size" in inspect.signature(builder).parameters:
        options["image_size"] = image_size
    train_t, val_t = transforms_for(image_size, augment, seed)
    return builder(root=root, train_transform=train_t, val_transform=val_t, seed=seed, **options)
