"""Data sets: the synthetic set is seeded and learnable; real loaders read small trees and files the tests write."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from aip.config import ConfigError, DataConfig
from aip.data import DATASETS, build_data


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def test_synthetic_is_deterministic_and_shaped() -> None:
    cfg = DataConfig(name="synthetic", num_classes=5, image_size=16, train_size=200, val_size=50, augment=False)
    a, b = build_data(cfg), build_data(cfg)
    xa, ya = _stack(a.train)
    xb, yb = _stack(b.train)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (200, 3, 16, 16) and a.input_shape == (3, 16, 16) and a.num_classes == 5
    assert set(ya.tolist()) == set(range(5)) and len(a.val) == 50


def test_synthetic_classes_are_separable_but_not_trivially() -> None:
    cfg = DataConfig(name="synthetic", num_classes=10, train_size=2000, val_size=500, augment=False)
    data = build_data(cfg)
    x, y = _stack(data.train)
    vx, vy = _stack(data.val)
    means = torch.stack([x[y == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(vx.flatten(1), means).argmin(1)
    accuracy = (pred == vy).float().mean().item()
    assert 0.5 < accuracy < 0.99  # chance is 0.1


def _write_tree(root: Path, split: str, classes: list[str], per_class: int, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_cifar10_reads_an_image_folder_tree_and_caches_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cifar"
    _write_tree(root, "train", ["cat", "dog"], 3)
    _write_tree(root, "test", ["cat", "dog"], 2)
    cfg = DataConfig(name="cifar10", root=str(root), augment=False)
    DATASETS.get("cifar10").validate(cfg)
    data = build_data(cfg)
    x, y = _stack(data.train)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and data.num_classes == 2 and len(data.val) == 4
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    (root / "train" / "cat" / "0.png").unlink()  # served from the cache from now on
    assert len(build_data(cfg).train) == 6


def test_cifar10_reads_torchvision_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    data = build_data(DataConfig(name="cifar10", root=str(tmp_path), train_subset=7))
    assert len(data.train) == 7 and len(data.val) == 4 and data.num_classes == 10
    assert data.train[0][0].shape == (3, 32, 32)


def test_imagefolder_layout(tmp_path: Path) -> None:
    _write_tree(tmp_path, "train", ["a", "b", "c"], 2, size=40)
    _write_tree(tmp_path, "val", ["a", "b", "c"], 1, size=40)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=24)
    DATASETS.get("imagefolder").validate(cfg)
    data = build_data(cfg)
    assert data.num_classes == 3 and data.input_shape == (3, 24, 24)
    assert data.train[0][0].shape == (3, 24, 24) and data.val[0][0].shape == (3, 24, 24)


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        (DataConfig(name="cifar10"), "data.root: required for data.name=cifar10"),
        (DataConfig(name="cifar10", root="/no/where"), "data.root: no cifar10 found at '/no/where'"),
        (DataConfig(name="cifar100", root="/no/where"), "data.root: no cifar100 found"),
        (DataConfig(name="fashion_mnist", root="/no/where"), "data.root: no FashionMNIST/raw/"),
        (DataConfig(name="imagefolder", root="/no/where"), "has no train or val/ folder"),
        (DataConfig(name="synthetic", train_size=10, batch_size=64), "data.train_size"),
    ],
)
def test_validation_errors_are_one_line(cfg: DataConfig, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        DATASETS.get(cfg.name).validate(cfg)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_damaged_torchvision_files_give_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ConfigError, match="data.root: .*cannot be read"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)))


def test_download_flag_skips_the_existence_check() -> None:
    DATASETS.get("cifar10").validate(DataConfig(name="cifar10", root="/no/where", download=True))
