"""Detection augmentation on tv_tensors (boxes move with the image), seeded per sample, and the batch collate.

torchvision's v2 transforms draw from torch's global generator; `SeededTransform` forks it and seeds it from
(seed, epoch, index), so the same sample gets the same flip in every run and a different one each epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

Target = dict[str, torch.Tensor]
Sample = tuple[tv_tensors.Image, Target]


def _labels_and_flags(inputs: Any) -> tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes filters along with the boxes: the labels and, where present, the iscrowd flags."""
    target = inputs[1] if isinstance(inputs, tuple) and len(inputs) == 2 else inputs
    return tuple(target[k] for k in ("labels", "iscrowd") if k in target)


def detection_transform(image_size: int | None, train: bool, flip: bool = True) -> v2.Compose:
    """Training: random horizontal flip; both: longer side resized to `image_size` (when set), float in [0, 1],
    boxes clamped and empty ones dropped with their labels."""
    steps: list[Callable] = []
    if train and flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if image_size is not None:
        steps.append(v2.Resize(size=None, max_size=image_size, antialias=True))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_flags),
    ]
    return v2.Compose(steps)


class SeededTransform:
    """A transform run under a generator seeded by (seed, epoch, index): reproducible, yet new every epoch."""

    def __init__(self, transform: Callable[..., Any], seed: int = 0) -> None:
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of augmentations (call once per epoch, as with a DistributedSampler)."""
        self.epoch = epoch

    def __call__(self, index: int, image: tv_tensors.Image, target: Target) -> Sample:
        """The transformed sample `index`; torch's global random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
            return self.transform(image, target)


def collate(batch: list[Sample]) -> tuple[list[torch.Tensor], list[Target]]:
    """Images of different sizes stay a list (torchvision's detectors batch them themselves), as do the targets."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
