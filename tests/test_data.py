"""Data sets: the synthetic set is seeded and learnable; real loaders read small trees and files the tests write."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from aip.batches import BatchTransform, MemoryImages
from aip.config import ConfigError, DataConfig
from aip.data import DATASETS, build_data
from aip.images import DataError


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
    assert len(build_data(cfg).train) == 6  # the same tree: served from the cache
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    (root / "train" / "cat" / "0.png").unlink()  # a changed tree is decoded again
    assert len(build_data(cfg).train) == 5


@pytest.mark.parametrize(
    ("name", "tv_class", "folder", "files", "label_key", "meta", "classes"),
    [
        (
            "cifar10",
            datasets.CIFAR10,
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            "labels",
            ("batches.meta", "label_names"),
            10,
        ),
        (
            "cifar100",
            datasets.CIFAR100,
            "cifar-100-python",
            ["train", "test"],
            "fine_labels",
            ("meta", "fine_label_names"),
            100,
        ),
    ],
)
def test_cifar_reads_torchvision_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    tv_class: type,
    folder: str,
    files: list[str],
    label_key: str,
    meta: tuple[str, str],
    classes: int,
) -> None:
    # The real files are checked against fixed MD5 sums; tiny stand-ins in the same pickle layout pass only without.
    monkeypatch.setattr(tv_class, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    base = tmp_path / folder
    base.mkdir()
    rng = np.random.default_rng(0)
    for file in files:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), label_key: [0, 1, 2, 3]}
        (base / file).write_bytes(pickle.dumps(batch))
    (base / meta[0]).write_bytes(pickle.dumps({meta[1]: [str(i) for i in range(classes)]}))
    cfg = DataConfig(name=name, root=str(tmp_path), train_subset=3, batch_size=2, augment=False)
    DATASETS.get(name).validate(cfg)
    data = build_data(cfg)
    train_images = 4 * (len(files) - 1)
    assert len(data.train) == 3 < train_images and len(data.val) == 4 and data.num_classes == classes
    x, y = data.val[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert data.input_shape == (3, 32, 32)


def _idx(array: np.ndarray) -> bytes:
    """The big-endian idx layout of the MNIST family: magic (uint8 type, rank), sizes, then the bytes."""
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 3)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n, dtype=np.uint8)))
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), batch_size=2)
    DATASETS.get("fashion_mnist").validate(cfg)
    data = build_data(cfg)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train) == 6 and len(data.val) == 3
    x, y = _stack(data.train)
    assert x.shape == (6, 1, 28, 28) and y.tolist() == list(range(6))


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
        (DataConfig(name="fashion_mnist"), "data.root: required for data.name=fashion_mnist"),
        (DataConfig(name="imagefolder"), "data.root: required for data.name=imagefolder"),
        (DataConfig(name="imagefolder", root="/no/where"), "data.root: no directory at '/no/where'"),
        (DataConfig(name="imagefolder", root="/"), "data.root: '/' has no train/ or val/ folder"),
        (DataConfig(name="synthetic", train_size=10, batch_size=64), "data.train_size"),
        (DataConfig(name="synthetic", train_subset=10, batch_size=64), "data.train_subset: 10 is smaller"),
        (DataConfig(name="cifar10", root="/no/where", download=True, train_subset=1), "data.train_subset"),
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


def test_download_still_needs_a_root() -> None:
    with pytest.raises(ConfigError, match="data.root: required"):
        DATASETS.get("cifar10").validate(DataConfig(name="cifar10", download=True))


def test_cifar10_image_folder_problems_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "big"
    _write_tree(root, "train", ["a", "b"], 2, size=40)
    _write_tree(root, "test", ["a", "b"], 1, size=40)
    with pytest.raises(ConfigError, match="must be 32x32 RGB.*data.name=imagefolder"):
        build_data(DataConfig(name="cifar10", root=str(root)))
    mixed = tmp_path / "mixed"
    _write_tree(mixed, "train", ["a"], 1)
    _write_tree(mixed, "train", ["b"], 1, size=40)
    _write_tree(mixed, "test", ["a", "b"], 1)
    with pytest.raises(ConfigError, match="differ in size"):
        build_data(DataConfig(name="cifar10", root=str(mixed)))
    other = tmp_path / "other"
    _write_tree(other, "train", ["a", "b"], 1)
    _write_tree(other, "test", ["a", "c"], 1)
    with pytest.raises(ConfigError, match="different class folders"):
        build_data(DataConfig(name="cifar10", root=str(other)))


def test_a_damaged_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cifar"
    _write_tree(root, "train", ["cat", "dog"], 2)
    _write_tree(root, "test", ["cat", "dog"], 1)
    cfg = DataConfig(name="cifar10", root=str(root), augment=False)
    first = _stack(build_data(cfg).train)
    for path in (tmp_path / "cache").glob("*.pt"):
        path.write_bytes(b"truncated")
    second = _stack(build_data(cfg).train)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_per_sample_cifar_augmentation_pads_crops_flips_and_normalises() -> None:
    image = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    labels = torch.zeros(1, dtype=torch.long)
    plain = MemoryImages(image, labels, BatchTransform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))[0][0]
    assert type(plain) is torch.Tensor and torch.allclose(plain, torch.ones(3, 32, 32))
    augment = MemoryImages(image, labels, BatchTransform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad=4, flip=True))
    outs = torch.stack([augment[0][0] for _ in range(50)])
    assert outs.shape == (50, 3, 32, 32)
    assert set(outs.unique().tolist()) == {-1.0, 1.0}  # the image, or the zero padding shifted in
    assert (outs == -1).any(dim=(1, 2, 3)).float().mean() > 0.5  # most crops are off-centre
    ramp = torch.arange(32, dtype=torch.uint8).expand(1, 1, 32, 32)
    flipping = MemoryImages(ramp, labels, BatchTransform((0.0,), (1.0,), flip=True))
    firsts = {round(flipping[0][0][0, 0, 0].item() * 255) for _ in range(40)}
    assert firsts == {0, 31}  # both orientations occur, nothing else


def test_loaders_return_plain_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    _write_tree(tmp_path / "c", "train", ["a", "b"], 1)
    _write_tree(tmp_path / "c", "test", ["a", "b"], 1)
    _write_tree(tmp_path / "i", "train", ["a"], 1, size=40)
    _write_tree(tmp_path / "i", "val", ["a"], 1, size=40)
    for cfg in (
        DataConfig(name="cifar10", root=str(tmp_path / "c"), batch_size=1),
        DataConfig(name="imagefolder", root=str(tmp_path / "i"), image_size=24, batch_size=1),
        DataConfig(name="synthetic", train_size=8, val_size=2, batch_size=1),
    ):
        data = build_data(cfg)
        assert type(data.train[0][0]) is torch.Tensor and type(data.val[0][0]) is torch.Tensor


def test_synthetic_augmentation_only_flips_training_images() -> None:
    cfg = DataConfig(name="synthetic", num_classes=3, image_size=8, train_size=4, val_size=4, batch_size=1)
    plain = build_data(DataConfig(**{**cfg.__dict__, "augment": False}))
    augmented = build_data(cfg)
    x = plain.train[0][0]
    seen = {bool(torch.equal(augmented.train[0][0], x)) for _ in range(30)}
    assert seen == {True, False}
    for _ in range(10):
        y = augmented.train[0][0]
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
    assert all(torch.equal(augmented.val[i][0], plain.val[i][0]) for i in range(4))


def test_train_subset_is_a_fixed_random_choice_across_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    _write_tree(tmp_path, "train", ["a", "b"], 20)  # listed class by class: the first 10 are all "a"
    _write_tree(tmp_path, "test", ["a", "b"], 1)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), train_subset=10, batch_size=2, augment=False)
    first, second = build_data(cfg).train, build_data(cfg).train
    assert len(first) == 10 and list(first.indices) == list(second.indices) != list(range(10))
    assert set(_stack(first)[1].tolist()) == {0, 1}
    synthetic = DataConfig(name="synthetic", train_size=100, train_subset=30, batch_size=10, augment=False)
    a, b = _stack(build_data(synthetic).train), _stack(build_data(synthetic).train)
    assert a[0].shape[0] == 30 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_decoded_cache_follows_changes_to_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cifar"
    _write_tree(root, "train", ["cat", "dog"], 2)
    _write_tree(root, "test", ["cat", "dog"], 1)
    cfg = DataConfig(name="cifar10", root=str(root), augment=False)
    first = build_data(cfg)
    x0 = first.train[0][0]
    image = root / "train" / "cat" / "0.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)  # rewritten in place
    stamp = image.stat().st_mtime_ns + 10**9
    os.utime(image, ns=(stamp, stamp))  # the clock may not have moved on this quickly
    assert not torch.equal(build_data(cfg).train[0][0], x0)
    _write_tree(root, "train", ["emu"], 1)
    _write_tree(root, "test", ["emu"], 1)
    assert build_data(cfg).num_classes == 3


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "not an image"])
def test_an_image_that_does_not_decode_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cifar"
    _write_tree(root, "train", ["cat", "dog"], 2)
    _write_tree(root, "test", ["cat", "dog"], 1)
    bad = root / "train" / "dog" / "1.png"
    _damage(bad, damage)
    with pytest.raises(DataError) as info:
        build_data(DataConfig(name="cifar10", root=str(root), augment=False))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bit-flipped":
        for i in range(60, 120):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"these are not the pixels you are looking for")


def test_a_damaged_image_in_a_loader_worker_is_one_line(tmp_path: Path) -> None:
    _write_tree(tmp_path, "train", ["a"], 2, size=40)
    _write_tree(tmp_path, "val", ["a"], 1, size=40)
    bad = tmp_path / "train" / "a" / "1.png"
    _damage(bad, "truncated")
    data = build_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=24, batch_size=1))
    loader = torch.utils.data.DataLoader(data.train, batch_size=1, num_workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value).startswith(f"cannot decode image {str(bad)!r}") and "Traceback" not in str(info.value)


def test_a_broken_link_in_a_cifar10_tree_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cifar"
    _write_tree(root, "train", ["cat", "dog"], 2)
    _write_tree(root, "test", ["cat", "dog"], 1)
    link = root / "train" / "dog" / "2.png"
    link.symlink_to(tmp_path / "moved-away.png")
    cfg = DataConfig(name="cifar10", root=str(root), augment=False)
    DATASETS.get("cifar10").validate(cfg)
    with pytest.raises(DataError) as info:
        build_data(cfg)
    assert str(info.value).startswith(f"cannot read {str(link)!r} (No such file or directory: a broken link?)")
    assert "\n" not in str(info.value)
