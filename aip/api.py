"""The Python API: `aip.run(cfg, teacher=model, train_data=..., val_data=..., out=...)` runs any mode on objects
in place of the config's names, under `python` or `accelerate launch` alike, with the command line's run-directory
rules; `aip.load_config` reads a recipe with dotted overrides; `aip.load_pruned` rebuilds a run's pruned student."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from aip.batches import memory_source
from aip.config import Config, ConfigError, config_from_dict
from aip.config import load_config as _load_config
from aip.data import DataBundle, eval_view
from aip.images import DataError
from aip.pruned import load_pruned
from aip.runner import execute, resolve
from aip.session import output_classes

__all__ = ["Result", "load_config", "load_pruned", "run"]

SHAPES_ALL = 1024  # user data sets up to this many samples have every image's shape checked before the run
SHAPES_SPREAD = 256  # larger ones: this many samples, spread evenly; `SameShape` checks the others as they are read


@dataclass
class Result:
    """What `aip.run` hands back: the recovered student (the trained or measured model in modes train and eval),
    the stage table (report.json's dict) and the run directory."""

    student: nn.Module
    report: dict[str, Any]
    run_dir: Path


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """A recipe (YAML; None: the defaults) with `key=value` overrides, checked: `ConfigError` names a bad key."""
    return _load_config(path, overrides)


def _sample(data: Dataset, index: int, what: str) -> torch.Tensor:
    """The image of sample `index` of `data`, checked to be part of an (image, label) pair, a (C, H, W) tensor."""
    where = "its first sample" if index == 0 else f"sample {index}"
    try:
        sample = data[index]
    except Exception as exc:
        raise ConfigError(f"{what}: {where} cannot be read ({type(exc).__name__}: {exc})") from None
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and torch.is_tensor(sample[0])):
        raise ConfigError(f"{what}: samples must be (image, label) pairs with a tensor image, got {type(sample)}")
    if sample[0].dim() != 3:
        raise ConfigError(f"{what}: images must be (C, H, W) tensors, got shape {tuple(sample[0].shape)}")
    return sample[0]


def _first_sample(data: Dataset, what: str) -> torch.Tensor:
    """The first image of `data`, checked to be an (image, label) pair with a (C, H, W) tensor image."""
    return _sample(data, 0, what)


def _differs(what: str, index: int, shape: tuple[int, ...], first: tuple[int, ...]) -> str:
    """The one line for an image whose shape is not the set's first image's."""
    return (
        f"{what}: sample {index} is a {shape} image, sample 0 a {first} one; batches need images of one size "
        "(resize or crop them in the data set)"
    )


def _checked_indices(count: int) -> list[int]:
    """Every index of a set of up to SHAPES_ALL samples, else SHAPES_SPREAD spread evenly from the first to the last."""
    if count <= SHAPES_ALL:
        return list(range(count))
    step = (count - 1) / (SHAPES_SPREAD - 1)
    return sorted({round(i * step) for i in range(SHAPES_SPREAD)})


def image_shape(data: Dataset, what: str) -> tuple[int, ...]:
    """The one image shape of `data`, checked before any work on the samples `_checked_indices` names (an in-memory
    uint8 set holds one shape by construction: its first sample alone); `SameShape` checks the rest as they are read.
    """
    first = tuple(_first_sample(data, what).shape)
    if memory_source(data) is not None:
        return first
    try:
        count = len(data)
    except TypeError:
        raise ConfigError(f"{what}: must be a Dataset with a length (map-style), got {type(data).__name__}") from None
    for index in _checked_indices(count)[1:]:
        shape = tuple(_sample(data, index, what).shape)
        if shape != first:
            raise ConfigError(_differs(what, index, shape, first))
    return first


class SameShape(Dataset):
    """A user's data set whose images are checked, as they are read, to have the shape the run was built for: one
    of another size would otherwise stop the run as a DataLoader collation traceback."""

    def __init__(self, dataset: Dataset, shape: tuple[int, ...], what: str) -> None:
        self.dataset, self.shape, self.what = dataset, shape, what

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        shape = tuple(sample[0].shape)
        if shape != self.shape:
            raise DataError(_differs(self.what, index, shape, self.shape))
        return sample


def _same_shape(data: Dataset, shape: tuple[int, ...], what: str) -> Dataset:
    """`data` checked as it is read (`SameShape`), unless it is held in memory as one tensor."""
    return data if memory_source(data) is not None else SameShape(data, shape, what)


def data_bundle(train: Dataset, val: Dataset, num_classes: int | None, fallback_classes: int) -> DataBundle:
    """User data sets as the trainer's bundle: the input shape from the first sample, the class count given
    (the model's) or else `fallback_classes` (the config's data.num_classes). Each set's images must share a shape
    (`image_shape`)."""
    shape, val_shape = image_shape(train, "train_data"), image_shape(val, "val_data")
    classes = num_classes if num_classes is not None else fallback_classes
    view = eval_view(train, val)
    return DataBundle(
        _same_shape(train, shape, "train_data"),
        _same_shape(val, val_shape, "val_data"),
        classes,
        shape,
        train_eval=_same_shape(view, shape, "train_data"),
    )


def run(
    cfg: Config | str | Path,
    teacher: nn.Module | None = None,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> Result:
    """Run `cfg.mode` (aip, acp, train, eval) and return the student and the stage table.

    `teacher`: a model instance (deep-copied, never modified) in place of model.name / model.teacher_checkpoint;
    in mode train it is the starting point, in mode eval the model measured. `train_data`, `val_data`: Datasets of
    (image, label) pairs in place of the config's data set (both or neither; used as they are: no augmentation or
    normalisation is added). `out`: the run directory (None: runs/<name>-<time>); one that already holds a run stops
    with an error unless `resume` ("auto" or a run directory / stage checkpoint: go on with it, which must have
    the same config) or `overwrite` (empty it first)."""
    # A Config object may have been changed since it was loaded: its types and values are checked again.
    cfg = load_config(cfg) if not isinstance(cfg, Config) else config_from_dict(cfg.to_dict())
    if (train_data is None) != (val_data is None):
        raise ConfigError("train_data and val_data: give both data sets, or neither for the config's data")
    if resume is not None and overwrite:
        raise ConfigError("resume and overwrite exclude each other: overwrite starts the run directory afresh")
    data = None
    if train_data is not None:
        example = _first_sample(train_data, "train_data")
        classes = output_classes(teacher, example) if teacher is not None else None
        data = data_bundle(train_data, val_data, classes, cfg.data.num_classes)
    run_dir, existing, checkpoint = resolve(cfg, out, resume)
    outcome = execute(cfg, run_dir, existing, resume=checkpoint, overwrite=overwrite, model=teacher, data=data)
    return Result(outcome.model, outcome.report, outcome.run_dir)
