"""The Python API: `aip.run(cfg, teacher=model, train_data=..., val_data=..., out=...)` runs any mode on objects
in place of the config's names, under `python` or `accelerate launch` alike, with the command line's run-directory
rules; `aip.load_config` reads a recipe with dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from aip.config import Config, ConfigError
from aip.config import load_config as _load_config
from aip.data import DataBundle, eval_view
from aip.runner import execute, resolve
from aip.session import output_classes


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


def _first_sample(data: Dataset, what: str) -> torch.Tensor:
    """The first image of `data`, checked to be an (image, label) pair with a (C, H, W) tensor image."""
    try:
        sample = data[0]
    except Exception as exc:
        raise ConfigError(f"{what}: its first sample cannot be read ({type(exc).__name__}: {exc})") from None
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and torch.is_tensor(sample[0])):
        raise ConfigError(f"{what}: samples must be (image, label) pairs with a tensor image, got {type(sample)}")
    if sample[0].dim() != 3:
        raise ConfigError(f"{what}: images must be (C, H, W) tensors, got shape {tuple(sample[0].shape)}")
    return sample[0]


def data_bundle(train: Dataset, val: Dataset, num_classes: int | None, fallback_classes: int) -> DataBundle:
    """User data sets as the trainer's bundle: the input shape from the first sample, the class count given
    (the model's) or else `fallback_classes` (the config's data.num_classes)."""
    example = _first_sample(train, "train_data")
    _first_sample(val, "val_data")
    classes = num_classes if num_classes is not None else fallback_classes
    return DataBundle(train, val, classes, tuple(example.shape), train_eval=eval_view(train, val))


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
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
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
