"""A seeded synthetic detection set: coloured rectangles and ellipses on noise, generated on access.

Class k is one colour and one shape (red rectangle, green ellipse, blue rectangle, ...), so the classes are easy to
tell apart and a small detector learns them in a few hundred steps; boxes are the shapes' exact extents.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from aip.errors import ConfigError
from aip.tasks.detection.data import BACKGROUND, DetectionData, SeededTransform, make_target, register_detection_dataset
from aip.tasks.detection.transforms import Sample

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 40),
    "magenta": (220, 40, 220),
    "cyan": (40, 220, 220),
}
SHAPES = ("rectangle", "ellipse")
MAX_CLASSES = len(COLOURS) * len(SHAPES)


def class_names(num_classes: int) -> list[str]:
    """'colour shape' for each object class: colours first, then the other shape for each colour."""
    colours = list(COLOURS)
    return [f"{colours[k % len(colours)]} {SHAPES[(k + k // len(colours)) % 2]}" for k in range(num_classes)]


class SyntheticShapes(Dataset):
    """`count` images of `size` x `size` pixels, sample i drawn from a generator seeded by (seed, i) (by (seed,
    ids[i]) once `select` has picked some)."""

    def __init__(
        self,
        count: int,
        size: int,
        num_classes: int,
        max_objects: int,
        seed: int,
        transform: SeededTransform | None = None,
    ) -> None:
        self.count, self.size, self.num_classes, self.max_objects = count, size, num_classes, max_objects
        self.seed, self.transform = seed, transform
        self.ids = list(range(count))  # the draws this set holds: sample i is draw ids[i]
        names = class_names(num_classes)
        self._colours = [COLOURS[n.split()[0]] for n in names]
        self._ellipse = [n.endswith("ellipse") for n in names]

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, i: int) -> Sample:
        """Sample `i` before any transform: a uint8 image and its target."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.ids[i])
        s = self.size
        image = 70.0 + 60.0 * torch.rand(3, s, s, generator=gen)
        ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
        n = int(torch.randint(1, self.max_objects + 1, (1,), generator=gen))
        rows, labels = [], []
        for _ in range(n):
            k = int(torch.randint(0, self.num_classes, (1,), generator=gen))
            w, h = ((0.2 + 0.3 * torch.rand(2, generator=gen)) * s).round().clamp(min=4).tolist()
            x1 = float(torch.randint(0, int(s - w) + 1, (1,), generator=gen))
            y1 = float(torch.randint(0, int(s - h) + 1, (1,), generator=gen))
            if self._ellipse[k]:
                cx, cy = x1 + w / 2, y1 + h / 2
                inside = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
            else:
                inside = (xs >= x1) & (xs < x1 + w) & (ys >= y1) & (ys < y1 + h)
            colour = torch.tensor(self._colours[k], dtype=torch.float32).view(3, 1, 1)
            image = torch.where(inside, colour + 20.0 * torch.randn(3, s, s, generator=gen), image)
            rows.append([x1, y1, x1 + w, y1 + h])
            labels.append(k + 1)
        pixels = tv_tensors.Image(image.clamp(0, 255).round().to(torch.uint8))
        boxes = torch.tensor(rows).reshape(-1, 4)
        return pixels, make_target(boxes, torch.tensor(labels), torch.zeros(n), (s, s))

    def __getitem__(self, i: int) -> Sample:
        image, target = self.sample(i)
        return (image, target) if self.transform is None else self.transform(i, image, target)

    def set_epoch(self, epoch: int) -> None:
        """New augmentations for a new epoch (reproducible for a given epoch)."""
        if self.transform is not None:
            self.transform.set_epoch(epoch)

    def select(self, indices: list[int]) -> SyntheticShapes:
        """The samples at `indices`, in that order, with the same transform."""
        view = copy.copy(self)
        view.ids = [self.ids[i] for i in indices]
        return view


@register_detection_dataset("synthetic")
def synthetic(
    root: str | Path | None,
    train_transform: SeededTransform,
    val_transform: SeededTransform,
    seed: int = 0,
    image_size: int | None = None,
    num_classes: int = 3,
    train_size: int = 256,
    val_size: int = 64,
    max_objects: int = 3,
) -> DetectionData:
    """Synthetic shapes: `num_classes` object classes (at most 12), images of `image_size` pixels (default 64).

    Train and validation samples come from disjoint seeds, so the validation images are new ones.
    """
    size = 64 if image_size is None else image_size
    if size < 16:
        raise ConfigError(f"data.image_size: at least 16 for the synthetic detection set, got {size}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"data.num_classes: 1 to {MAX_CLASSES} object classes for synthetic, got {num_classes}")
    if train_size < 1 or val_size < 1 or max_objects < 1:
        raise ConfigError("data: train_size, val_size and max_objects must be at least 1 for synthetic")
    train = SyntheticShapes(train_size, size, num_classes, max_objects, 2 * seed, train_transform)
    val = SyntheticShapes(val_size, size, num_classes, max_objects, 2 * seed + 1, val_transform)
    return DetectionData(train, val, num_classes + 1, [BACKGROUND, *class_names(num_classes)])
