"""`build_detection_data`: a registered detection data set (pennfudan, voc, coco, synthetic) with its transforms;
`check_detection_data`: the data.* keys a detection run refuses before any work."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aip.tasks.detection.sources  # noqa: F401  (registers pennfudan, voc, coco)
import aip.tasks.detection.synthetic  # noqa: F401  (registers synthetic)
from aip.errors import ConfigError
from aip.tasks.detection.data import DATA_SEED, DETECTION_DATASETS, DetectionData, train_subset, transforms_for

if TYPE_CHECKING:
    from aip.config import DataConfig

_FILLED = ("root", "train_transform", "val_transform", "seed", "image_size")
_DROPPED = "(incomplete batches are dropped, so no step would run)"


def build_detection_data(
    name: str,
    root: str | Path | None = None,
    image_size: int | None = None,
    augment: bool = True,
    seed: int = 0,
    subset: int | None = None,
    **options: Any,
) -> DetectionData:
    """The registered detection data set `name` with its transforms.

    `image_size` bounds the longer side of every image (None keeps the files' sizes; the synthetic set draws its
    images at that size); `seed` (the run's) fixes the augmentation only: the split, the synthetic draws and the
    `subset` training samples kept come from the constant DATA_SEED; `options` are the data set's own (e.g. val_size
    for pennfudan, train_split for voc, num_classes for synthetic).
    """
    builder = DETECTION_DATASETS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in _FILLED]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"data: {name} has no option {', '.join(unknown)}; it takes {', '.join(accepted) or 'none'}")
    if "image_size" in inspect.signature(builder).parameters:
        options["image_size"] = image_size
    train_t, val_t = transforms_for(image_size, augment, seed)
    data = builder(root=root, train_transform=train_t, val_transform=val_t, seed=DATA_SEED, **options)
    if subset is not None:
        data.train = train_subset(data.train, subset)
    return data


def check_detection_data(cfg: DataConfig) -> None:
    """What a detection run cannot honour, as one-line ConfigErrors before any work: data.mean and data.std (a
    detector normalises inside its own transform) and a training set or subset smaller than one batch."""
    for key in ("mean", "std"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"data.{key}: detectors normalise inside the model (its transform's image_mean and image_std); "
                f"set model.kwargs.image_{key} instead and leave data.{key} null"
            )
    if cfg.train_subset is not None and cfg.train_subset < cfg.batch_size:
        raise ConfigError(
            f"data.train_subset: {cfg.train_subset} is smaller than data.batch_size={cfg.batch_size} {_DROPPED}"
        )
    size = cfg.options.get("train_size", cfg.train_size) if cfg.name == "synthetic" else None
    if isinstance(size, int) and size < cfg.batch_size:
        raise ConfigError(f"data.train_size: {size} is smaller than data.batch_size={cfg.batch_size} {_DROPPED}")


def check_train_size(data: DetectionData, cfg: DataConfig) -> None:
    """The training set as built (split, subset) holds at least one batch; a one-line ConfigError otherwise."""
    if len(data.train) < cfg.batch_size:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} is more than the {len(data.train)} training images of {cfg.name} "
            f"{_DROPPED}"
        )
