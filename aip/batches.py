"""In-memory image sets held as one uint8 tensor, fetched a whole batch at a time and augmented on the device.

A batch of an in-memory set leaves the loader as uint8 (a quarter of float32's bytes to copy), and is cropped,
flipped and normalised where the model runs, for the whole batch at once (`BatchTransform`). Its random crop
offsets and flips come from a generator seeded per batch by the caller (the session derives the seed from the run's
seed, the stage, the epoch and the batch's index), so a resumed epoch that skips its first batches still draws what
an unbroken run draws. Indexed one sample at a time, the same sets give normalised float images, augmented from the
global random stream: what calibration passes, ACP's measurements and user code read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

AUTO_WORKERS_CAP = 8  # decoding workers of `data.num_workers: auto`, at most


@dataclass(frozen=True)
class BatchTransform:
    """uint8 (N, C, H, W) images to normalised float32: optional zero-pad by `pad` and random crop back to the same
    size, optional random horizontal flip, then `(x / 255 - mean) / std` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0
    flip: bool = False

    @property
    def random(self) -> bool:
        """Whether the transform draws random numbers (crops or flips)."""
        return self.pad > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets (rows, columns, each in 0..2*pad) and flip flags of `n` images, drawn on the CPU from
        `generator` (None: the global stream), so that a seed gives the same batch on any device."""
        rows = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        cols = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        flips = torch.randint(0, 2, (n,), generator=generator).bool() if self.flip else torch.zeros(n, dtype=torch.bool)
        return rows, cols, flips

    def apply(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 `x` cropped at the given offsets of its zero-padded self, flipped where `flips`, and normalised;
        crop and flip are one gather, on `x`'s device."""
        n, _, h, w = x.shape
        if self.random:
            device = x.device
            rows, cols, flips = rows.to(device), cols.to(device), flips.to(device)
            ys = rows[:, None] + torch.arange(h, device=device)  # (N, H) rows of the padded image
            xs = torch.arange(w, device=device).expand(n, w)
            xs = torch.where(flips[:, None], w - 1 - xs, xs) + cols[:, None]  # (N, W), reversed where flipped
            padded = F.pad(x, (self.pad,) * 4) if self.pad else x
            batch = torch.arange(n, device=device)[:, None, None]
            x = padded[batch, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 `x` as float32, `(x / 255 - mean) / std` per channel."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x.float() / 255 - mean) / std).contiguous()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment and normalise the batch `x` with offsets and flips drawn from `generator`."""
        return self.apply(x, *self.draw(len(x), generator)) if self.random else self.normalise(x)

    def without_augmentation(self) -> BatchTransform:
        """The same normalisation, no crop or flip: the validation transform."""
        return BatchTransform(self.mean, self.std)


class MemoryImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with their labels and a `BatchTransform`.

    `images[i]` is one normalised float image (augmented from the global random stream when the transform is);
    `fetch(indices)` is a whole batch, still uint8, for the device to transform. A shallow copy with another
    `transform` is a view of the same images (`aip.data.eval_view`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"MemoryImages: expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i : i + 1])[0], int(self.labels[i])

    def fetch(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and labels at `indices`, as one batch."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


def memory_source(dataset: Dataset) -> tuple[MemoryImages, list[int] | None] | None:
    """The `MemoryImages` under `dataset` (itself, or through `Subset`s) and the map from `dataset`'s indices to
    its (None: the identity); None for any other data set."""
    mapping: list[int] | None = None
    while isinstance(dataset, Subset):
        inner = [int(i) for i in dataset.indices]
        mapping = inner if mapping is None else [inner[i] for i in mapping]
        dataset = dataset.dataset
    return (dataset, mapping) if isinstance(dataset, MemoryImages) else None


def fetch_batch(dataset: Dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole uint8 batch of an in-memory `dataset` (see `memory_source`)."""
    source = memory_source(dataset)
    if source is None:
        raise TypeError(f"{type(dataset).__name__} is not held in memory as uint8 images")
    images, mapping = source
    return images.fetch(indices if mapping is None else [mapping[int(i)] for i in indices])


def device_transform(dataset: Dataset) -> BatchTransform | None:
    """The transform to run on the device for batches of `dataset` fetched whole; None when it is not in memory."""
    source = memory_source(dataset)
    return None if source is None else source[0].transform


def whole_batch(batch: Any) -> Any:
    """A DataLoader `collate_fn` for data sets whose `__getitems__` already returns the batch."""
    return batch


class WholeBatches(Dataset):
    """An in-memory data set read a whole batch at a time (no augmentation: the validation loader)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.device_transform = device_transform(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return fetch_batch(self.dataset, indices)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which a job scheduler or `taskset` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def resolve_workers(setting: int | str, in_memory: bool, local_processes: int = 1) -> int:
    """`data.num_workers` as a count: `auto` is none for in-memory sets (a batch is one tensor index), else the
    CPUs given to this process shared among the processes on this machine, at most AUTO_WORKERS_CAP."""
    if setting != "auto":
        return int(setting)
    if in_memory:
        return 0
    return max(1, min(AUTO_WORKERS_CAP, cpu_count() // max(1, local_processes)))
