"""Detection data sets: samples are (tv_tensors.Image, {"boxes": BoundingBoxes XYXY, "labels", "iscrowd"}).

Label 0 is the background (torchvision's detectors count it in num_classes); object classes are 1..K. Objects
marked difficult (VOC) or crowd (COCO) are dropped from training and kept in validation as `iscrowd` ignore regions,
which the COCO-style metric neither rewards nor penalises. The data sets register here; `datasets.py` builds them.
What the data is (a data set's own split, the synthetic draws, `data.train_subset`) comes from `DATA_SEED`, fixed
as `aip.data.SUBSET_SEED` is: a teacher reused at another seed never validates on the images it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from aip.data import SUBSET_SEED
from aip.errors import ConfigError
from aip.images import load_image
from aip.registry import Registry
from aip.tasks.detection.transforms import Sample, SeededTransform, detection_transform

DETECTION_DATASETS = Registry("detection dataset")
register_detection_dataset = DETECTION_DATASETS.register
BACKGROUND = "__background__"
DATA_SEED = SUBSET_SEED  # splits, subsets and synthetic draws: a constant, never the run's seed


@dataclass
class Record:
    """One image on disk and its objects: boxes (K, 4) XYXY in pixels, labels (K,), iscrowd (K,) of 0/1."""

    image: Path
    boxes: torch.Tensor
    labels: torch.Tensor
    iscrowd: torch.Tensor

    def without_ignored(self) -> Record:
        """The record with the crowd/difficult objects left out (what training sees)."""
        keep = self.iscrowd == 0
        return Record(self.image, self.boxes[keep], self.labels[keep], self.iscrowd[keep])


def make_target(boxes: torch.Tensor, labels: torch.Tensor, iscrowd: torch.Tensor, size: tuple[int, int]) -> dict:
    """A target dict in torchvision's layout; `size` is the image's (H, W)."""
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=size),
        "labels": labels.long().reshape(-1),
        "iscrowd": iscrowd.long().reshape(-1),
    }


class DetectionSet(Dataset):
    """Images read from disk on access (RGB uint8), with their targets, through an optional seeded transform."""

    def __init__(self, records: list[Record], transform: SeededTransform | None = None) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        image = tv_tensors.Image(pil_to_tensor(load_image(str(rec.image))))
        target = make_target(rec.boxes, rec.labels, rec.iscrowd, tuple(image.shape[-2:]))
        if self.transform is None:
            return image, target
        return self.transform(i, image, target)

    def set_epoch(self, epoch: int) -> None:
        """New augmentations for a new epoch (reproducible for a given epoch)."""
        if self.transform is not None:
            self.transform.set_epoch(epoch)

    def select(self, indices: list[int]) -> DetectionSet:
        """The samples at `indices`, in that order, with the same transform."""
        return DetectionSet([self.records[i] for i in indices], self.transform)


@dataclass
class DetectionData:
    """Train and validation sets; num_classes counts the background, as torchvision's detectors expect."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]  # index = label; class_names[0] is the background


def transforms_for(image_size: int | None, augment: bool, seed: int) -> tuple[SeededTransform, SeededTransform]:
    """Train and validation transforms: flips for training when augmenting; resizing and scaling for both."""
    return (
        SeededTransform(detection_transform(image_size, train=True, flip=augment), seed),
        SeededTransform(detection_transform(image_size, train=False), seed),
    )


def train_subset(dataset: Dataset, size: int) -> Dataset:
    """A fixed random choice of `size` samples of `dataset` (by DATA_SEED, kept in index order), as `aip.data`
    takes `data.train_subset`; the whole set when it has no more than `size`."""
    if size >= len(dataset):
        return dataset
    if not callable(getattr(dataset, "select", None)):
        raise ConfigError(f"data.train_subset: {type(dataset).__name__} has no select(indices) to take a subset with")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(DATA_SEED))
    return dataset.select(sorted(order[:size].tolist()))


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random split of range(n): (train, val) index lists, each in ascending order."""
    if not 0 < val_size < n:
        raise ConfigError(f"data.val_size: must be between 1 and {n - 1} for {n} images, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


def require_dir(root: str | Path | None, name: str, expected: str) -> Path:
    """`root` as a Path that exists; else a one-line ConfigError saying which layout `name` expects."""
    if root is None:
        raise ConfigError(f"data.root: required for data.name={name}; set it to {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data.root: {str(path)!r} is not a directory; data.name={name} expects {expected}")
    return path
