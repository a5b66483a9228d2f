"""data.mean / data.std replace each data set's normalisation; bad values are one-line config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aip.checks import check_names
from aip.config import ConfigError, DataConfig, config_from_dict
from aip.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, build_data

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


def _tree(root: Path, splits: tuple[str, ...], size: int) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )


def _first(data) -> torch.Tensor:
    return data.val[0][0]


def _renormalise(x: torch.Tensor, old: tuple, new: list) -> torch.Tensor:
    """What `x`, normalised with `old`, becomes when normalised with `new` instead."""
    view = (-1, 1, 1)
    raw = x * torch.tensor(old[1]).view(view) + torch.tensor(old[0]).view(view)
    return (raw - torch.tensor(new[0]).view(view)) / torch.tensor(new[1]).view(view)


def test_cifar10_override_replaces_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    _tree(tmp_path / "c", ("train", "test"), 32)
    base = DataConfig(name="cifar10", root=str(tmp_path / "c"), augment=False)
    default = _first(build_data(base))
    raw = torch.from_numpy(np.array(Image.open(tmp_path / "c" / "test" / "a" / "0.png"))).permute(2, 0, 1) / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(-1, 1, 1), torch.tensor(CIFAR10_STD).view(-1, 1, 1)
    torch.testing.assert_close(default, (raw - mean) / std)
    override = _first(
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "c"), augment=False, mean=MEAN, std=STD))
    )
    torch.testing.assert_close(override, _renormalise(default, (CIFAR10_MEAN, CIFAR10_STD), [MEAN, STD]))
    assert not torch.allclose(override, default)


def test_only_the_mean_may_be_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    _tree(tmp_path / "c", ("train", "test"), 32)
    default = _first(build_data(DataConfig(name="cifar10", root=str(tmp_path / "c"), augment=False)))
    shifted = _first(build_data(DataConfig(name="cifar10", root=str(tmp_path / "c"), augment=False, mean=[0, 0, 0])))
    torch.testing.assert_close(shifted, _renormalise(default, (CIFAR10_MEAN, CIFAR10_STD), [[0, 0, 0], CIFAR10_STD]))


def test_imagefolder_override(tmp_path: Path) -> None:
    _tree(tmp_path / "f", ("train", "val"), 20)
    cfg = {"name": "imagefolder", "root": str(tmp_path / "f"), "image_size": 16, "augment": False}
    default = _first(build_data(DataConfig(**cfg)))
    override = _first(build_data(DataConfig(**cfg, mean=MEAN, std=STD)))
    assert default.shape == (3, 16, 16)
    torch.testing.assert_close(override, _renormalise(default, (IMAGENET_MEAN, IMAGENET_STD), [MEAN, STD]))


def test_synthetic_applies_it_to_its_raw_values() -> None:
    cfg = {"num_classes": 3, "image_size": 8, "train_size": 64, "val_size": 8, "batch_size": 8, "augment": False}
    raw = build_data(DataConfig(**cfg))
    normed = build_data(DataConfig(**cfg, mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 0.5]))
    expected = (_first(raw) - torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1)) / torch.tensor([2.0, 4.0, 0.5]).view(
        -1, 1, 1
    )
    torch.testing.assert_close(_first(normed), expected)
    assert normed.val[0][1] == raw.val[0][1]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"std": [0.2, 0.0, 0.2]}, "data.std: every value must be > 0"),
        ({"std": [0.2, -1.0, 0.2]}, "data.std: every value must be > 0"),
        ({"mean": []}, "data.mean: one number per image channel"),
        ({"mean": [0.1, float("nan"), 0.1]}, "data.mean[1]: must be a finite number"),
        ({"mean": [0.5]}, "data.mean: synthetic images have 3 channels, so give 3 values; got 1"),
        ({"name": "fashion_mnist", "std": [0.3, 0.3, 0.3]}, "data.std: fashion_mnist images have 1 channel, so give 1"),
        ({"mean": "0.5"}, "data.mean: expected a list of a number or null"),
    ],
)
def test_bad_values_are_one_line_errors(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_names(config_from_dict({"data": data}))
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
