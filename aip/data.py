"""Dataset registry: cifar10, cifar100, fashion_mnist, imagefolder (ImageNet layout) and a seeded synthetic set.

Nothing is downloaded unless `data.download: true`. Each entry checks its config cheaply (`validate`, called before
any work) and builds train and validation sets with the usual augmentations (`build`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2
from tqdm.auto import tqdm

from aip.config import ConfigError, DataConfig
from aip.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)


class TensorImages(Dataset):
    """Images held in memory as one tensor (uint8 or float), with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i])


def cache_dir() -> Path:
    """Where decoded data sets are cached: $AIP_CACHE_DIR, else ~/.cache/aip."""
    return Path(os.environ.get("AIP_CACHE_DIR", Path.home() / ".cache" / "aip"))


def _require_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise ConfigError(f"data.root: required for data.name={cfg.name}; set it to the directory that holds {what}")
    return Path(cfg.root)


def _cifar_transforms(mean, std, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose([v2.ToImage(), *train, *norm]), v2.Compose([v2.ToImage(), *norm])


def build_data(cfg: DataConfig) -> DataBundle:
    """Build the configured data set; `train_subset` keeps the first N training samples."""
    bundle = DATASETS.get(cfg.name).build(cfg)
    if cfg.train_subset is not None and cfg.train_subset < len(bundle.train):
        bundle.train = Subset(bundle.train, range(cfg.train_subset))
    return bundle


@register_dataset("synthetic")
class Synthetic:
    """Seeded, learnable images: a smooth random template per class, varied in contrast and position, plus noise.

    The same config always yields the same data. Classes are separable (a small CNN passes 60% top-1 on 10 classes
    within a few epochs) but not at once, so accuracy and its recovery after pruning mean something in tests.
    """

    SEED = 1234

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        if cfg.image_size < 8:
            raise ConfigError(f"data.image_size: at least 8 for the synthetic set, got {cfg.image_size}")
        if cfg.train_size < cfg.batch_size:
            raise ConfigError(f"data.train_size: {cfg.train_size} is smaller than data.batch_size={cfg.batch_size}")
        if cfg.val_size < 1:
            raise ConfigError(f"data.val_size: must be >= 1, got {cfg.val_size}")

    NOISE = 2.0
    DISTRACTOR = 0.8

    @classmethod
    def _make(cls, templates: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k, c, s, _ = templates.shape
        labels = torch.randint(0, k, (n,), generator=gen)
        others = (labels + torch.randint(1, k, (n,), generator=gen)) % k  # a different class, mixed in weaker
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
        mix = cls.DISTRACTOR * torch.rand(n, 1, 1, 1, generator=gen)
        images = (templates[labels] + mix * templates[others]) * contrast
        shifts = torch.randint(-s // 8, s // 8 + 1, (n, 2), generator=gen)
        for i in range(n):
            images[i] = torch.roll(images[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        images = images + cls.NOISE * torch.randn(n, c, s, s, generator=gen)
        return images, labels

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        gen = torch.Generator().manual_seed(cls.SEED + cfg.num_classes * 1000 + cfg.image_size)
        s = cfg.image_size
        coarse = torch.randn(cfg.num_classes, 3, max(2, s // 8), max(2, s // 8), generator=gen)
        templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        train_x, train_y = cls._make(templates, cfg.train_size, gen)
        val_x, val_y = cls._make(templates, cfg.val_size, gen)
        flip = v2.RandomHorizontalFlip() if cfg.augment else None
        return DataBundle(TensorImages(train_x, train_y, flip), TensorImages(val_x, val_y), cfg.num_classes, (3, s, s))


def _torchvision_pair(tv_class: type, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Train and test splits of a torchvision data set; missing or damaged files become one ConfigError line."""
    try:
        return tuple(tv_class(str(cfg.root), train=t, download=cfg.download) for t in (True, False))
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            f"data.root: the {cfg.name} files under {cfg.root!r} cannot be read ({exc}); fix them, or set "
            "data.download=true"
        ) from None


def _decode_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode an ImageFolder tree of equal-sized images once into a uint8 tensor, cached on disk by path."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    path = cache_dir() / f"imagefolder-{key}.pt"
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        return blob["images"], blob["labels"], blob["classes"]
    folder = datasets.ImageFolder(str(root))
    to_tensor = v2.PILToTensor()
    images = []
    for file, _ in tqdm(folder.samples, desc=f"decoding {root} (once)", leave=False):
        images.append(to_tensor(folder.loader(file)))
    blob = {"images": torch.stack(images), "labels": torch.tensor(folder.targets), "classes": folder.classes}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return blob["images"], blob["labels"], blob["classes"]


class _Cifar:
    """torchvision's CIFAR files under data.root, or (CIFAR-10) an ImageFolder tree root/train, root/test."""

    tv_class: type = datasets.CIFAR10
    folder_name = "cifar-10-batches-py"
    classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    image_folder = True

    @classmethod
    def _is_folder(cls, root: Path) -> bool:
        return cls.image_folder and (root / "train").is_dir() and (root / "test").is_dir()

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        root = _require_root(cfg, f"{cfg.name} ({cls.folder_name}/)")
        if cfg.download:
            return
        if not (root / cls.folder_name).is_dir() and not cls._is_folder(root):
            also = " or an ImageFolder tree with train/ and test/" if cls.image_folder else ""
            raise ConfigError(
                f"data.root: no {cfg.name} found at {str(root)!r} (expected torchvision's {cls.folder_name}/{also}); "
                "fix data.root, or set data.download=true to fetch it"
            )

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        root = Path(cfg.root)
        train_t, val_t = _cifar_transforms(cls.mean, cls.std, cfg.augment)
        if cls._is_folder(root):
            (tx, ty, classes), (vx, vy, _) = _decode_folder(root / "train"), _decode_folder(root / "test")
            return DataBundle(
                TensorImages(tx, ty, train_t), TensorImages(vx, vy, val_t), len(classes), tuple(tx.shape[1:])
            )
        train, val = _torchvision_pair(cls.tv_class, cfg)
        to_chw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return DataBundle(
            TensorImages(to_chw(train.data), torch.tensor(train.targets), train_t),
            TensorImages(to_chw(val.data), torch.tensor(val.targets), val_t),
            cls.classes,
            (3, 32, 32),
        )


@register_dataset("cifar10")
class Cifar10(_Cifar):
    pass


@register_dataset("cifar100")
class Cifar100(_Cifar):
    tv_class = datasets.CIFAR100
    folder_name = "cifar-100-python"
    classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    image_folder = False


@register_dataset("fashion_mnist")
class FashionMNIST:
    """torchvision's FashionMNIST files under data.root: 1x28x28, 10 classes."""

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        root = _require_root(cfg, "FashionMNIST/raw/")
        if not cfg.download and not (root / "FashionMNIST" / "raw").is_dir():
            raise ConfigError(
                f"data.root: no FashionMNIST/raw/ at {str(root)!r}; fix data.root, or set data.download=true"
            )

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.2860,), (0.3530,))]
        aug = [v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()] if cfg.augment else []
        train, val = _torchvision_pair(datasets.FashionMNIST, cfg)
        return DataBundle(
            TensorImages(train.data[:, None], train.targets, v2.Compose([*aug, *norm])),
            TensorImages(val.data[:, None], val.targets, v2.Compose(norm)),
            10,
            (1, 28, 28),
        )


@register_dataset("imagefolder")
class ImageFolderData:
    """ImageNet layout: root/train/<class>/*, root/val/<class>/*; crops of data.image_size (224 when left at 32)."""

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        root = _require_root(cfg, "train/ and val/ class folders")
        missing = [d for d in ("train", "val") if not (root / d).is_dir()]
        if missing:
            raise ConfigError(f"data.root: {str(root)!r} has no {' or '.join(missing)}/ folder (ImageNet layout)")

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        size = 224 if cfg.image_size == 32 else cfg.image_size
        norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        aug = (
            [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
            if cfg.augment
            else [v2.Resize(size + size // 7), v2.CenterCrop(size)]
        )
        train = datasets.ImageFolder(str(Path(cfg.root) / "train"), transform=v2.Compose([*aug, *norm]))
        val_t = v2.Compose([v2.Resize(size + size // 7), v2.CenterCrop(size), *norm])
        val = datasets.ImageFolder(str(Path(cfg.root) / "val"), transform=val_t)
        return DataBundle(train, val, len(train.classes), (3, size, size))
