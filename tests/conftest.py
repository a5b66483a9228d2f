"""Shared fixtures: seeded RNGs and small run configs on synthetic data."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


def tiny_run(**overrides: Any) -> dict[str, Any]:
    """A config dict for a seconds-long AIP run: ResNet-8 on 16x16 synthetic images, 2 intervals to 60% FLOPs."""
    cfg: dict[str, Any] = {
        "mode": "aip",
        "seed": 0,
        "name": "tiny",
        "model": {"name": "cifar_resnet8"},
        "data": {
            "name": "synthetic",
            "num_classes": 4,
            "image_size": 16,
            "train_size": 256,
            "val_size": 128,
            "batch_size": 32,
            "eval_batch_size": 128,
        },
        "train": {"teacher_epochs": 2, "lr": 0.05, "log_every": 2},
        "prune": {
            "criterion": "l1",
            "target_flops_ratio": 0.6,
            "intervals": 2,
            "epochs_between": 1,
            "finetune_epochs": 1,
        },
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


IMAGES = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # the size tiny_run's images have


def exported_outputs(run_dir: Path) -> torch.Tensor:
    """The run's exported model on a fixed batch: resumed runs must export what an unbroken run exports."""
    with torch.no_grad():
        return torch.export.load(Path(run_dir) / "model_pruned.pt2").module()(IMAGES)


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps one state per process (mixed precision, accumulation): none of it may leak between tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
