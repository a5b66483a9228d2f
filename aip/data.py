"""Dataset registry: cifar10, cifar100, fashion_mnist, imagefolder (ImageNet layout) and a seeded synthetic set.

Nothing is downloaded unless `data.download: true`. Each entry checks its config cheaply (`validate`, called before
any work) and builds train and validation sets with the usual augmentations (`build`). Sets that fit in memory
(CIFAR, FashionMNIST, the synthetic set) are held as one uint8 tensor and augmented a batch at a time on the device
(`aip.batches`); ImageNet-layout trees are decoded from their files per sample, in loader workers. `data.mean` and
`data.std` replace a data set's normalisation; the synthetic set has none of its own, so there they apply to its raw
values.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from aip.batches import BatchTransform, MemoryImages
from aip.config import ConfigError, DataConfig
from aip.images import decode_folder, load_image
from aip.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# What a damaged or incomplete torchvision data set raises while loading (pickle, idx parsing, missing keys).
_LOAD_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    pickle.UnpicklingError,
    KeyError,
    ValueError,
    TypeError,
    AssertionError,
)


@dataclass
class DataBundle:
    """Train and validation sets plus what a model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    # The training images through the validation transform (no augmentation), index for index like `train`: what
    # measurements on training images (ACP's fitness and channel responses) read. build_data fills it in.
    train_eval: Dataset | None = None


def eval_view(train: Dataset, val: Dataset) -> Dataset:
    """`train` with `val`'s transform (a shallow copy: the images are shared), for data sets that hold their
    transform as a `transform` attribute (ours and torchvision's); otherwise `train` itself."""
    if not (hasattr(train, "transform") and hasattr(val, "transform")):
        return train
    view = copy.copy(train)
    view.transform = val.transform
    return view


SUBSET_SEED = 0


def build_data(cfg: DataConfig) -> DataBundle:
    """Build the configured data set; `train_subset` keeps a fixed random choice of N training samples.

    Random rather than the first N because folder trees list their images class by class; fixed (a constant seed,
    not the run's) so that every run and every process trains on the same images.
    """
    bundle = DATASETS.get(cfg.name).build(cfg)
    if bundle.train_eval is None:
        bundle.train_eval = eval_view(bundle.train, bundle.val)
    if cfg.train_subset is not None and cfg.train_subset < len(bundle.train):
        order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(SUBSET_SEED))
        keep = sorted(order[: cfg.train_subset].tolist())
        bundle.train, bundle.train_eval = Subset(bundle.train, keep), Subset(bundle.train_eval, keep)
    return bundle


def _require_root(cfg: DataConfig, what: str) -> Path:
    """data.root as a Path; a one-line ConfigError when it is unset."""
    if cfg.root is None:
        raise ConfigError(f"data.root: required for data.name={cfg.name}; set it to the directory that holds {what}")
    return Path(cfg.root)


def _check_norm(cfg: DataConfig, channels: int) -> None:
    """data.mean and data.std, when set, give one value per image channel (std > 0 is checked with the config)."""
    for key in ("mean", "std"):
        values = getattr(cfg, key)
        if values is not None and len(values) != channels:
            raise ConfigError(
                f"data.{key}: {cfg.name} images have {channels} channel{'s' if channels > 1 else ''}, so give "
                f"{channels} value{'s' if channels > 1 else ''}; got {len(values)}"
            )


def _norm(
    cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data set's default normalisation, with data.mean / data.std in its place where set."""
    return tuple(cfg.mean or mean), tuple(cfg.std or std)


def _check_subset(cfg: DataConfig) -> None:
    """Training drops incomplete batches, so a subset smaller than one batch would train on nothing."""
    if cfg.train_subset is not None and cfg.train_subset < cfg.batch_size:
        raise ConfigError(
            f"data.train_subset: {cfg.train_subset} is smaller than data.batch_size={cfg.batch_size} "
            "(incomplete batches are dropped, so no step would run)"
        )


def _pad_crop_flip(
    mean: tuple[float, ...], std: tuple[float, ...], pad: int, augment: bool
) -> tuple[BatchTransform, BatchTransform]:
    """Train and eval transforms: pad-crop and flip for training when augmenting; normalisation for both."""
    train = BatchTransform(mean, std, pad if augment else 0, augment)
    return train, train.without_augmentation()


@register_dataset("synthetic")
class Synthetic:
    """Seeded, learnable images: a smooth random template per class, varied in contrast and position, plus noise.

    The same config always yields the same data. Classes are separable (a small CNN passes 60% top-1 on 10 classes
    within a few epochs) but not at once, so accuracy and its recovery after pruning mean something in tests.
    """

    SEED = 1234
    NOISE = 2.0
    DISTRACTOR = 0.8
    RANGE = (-10.0, 10.0)  # raw values kept as uint8 over this range

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        """Sizes only; nothing is generated."""
        if cfg.image_size < 8:
            raise ConfigError(f"data.image_size: at least 8 for the synthetic set, got {cfg.image_size}")
        if cfg.num_classes < 2:
            raise ConfigError(f"data.num_classes: at least 2 for the synthetic set, got {cfg.num_classes}")
        if cfg.train_size < cfg.batch_size:
            raise ConfigError(f"data.train_size: {cfg.train_size} is smaller than data.batch_size={cfg.batch_size}")
        if cfg.val_size < 1:
            raise ConfigError(f"data.val_size: must be >= 1, got {cfg.val_size}")
        _check_subset(cfg)
        _check_norm(cfg, 3)

    @classmethod
    def _make(cls, templates: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` labelled samples: template x contrast, a weaker other-class template mixed in, shifted, plus noise."""
        k, c, s, _ = templates.shape
        labels = torch.randint(0, k, (n,), generator=gen)
        others = (labels + torch.randint(1, k, (n,), generator=gen)) % k  # a different class, mixed in weaker
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
        mix = cls.DISTRACTOR * torch.rand(n, 1, 1, 1, generator=gen)
        images = (templates[labels] + mix * templates[others]) * contrast
        shifts = torch.randint(-s // 8, s // 8 + 1, (n, 2), generator=gen)
        # Per-sample circular shift (torch.roll's convention) as one gather: out[..., y, x] = in[..., y - dy, x - dx].
        grid = torch.arange(s)
        ys, xs = (grid - shifts[:, :1]) % s, (grid - shifts[:, 1:]) % s
        images = images[
            torch.arange(n)[:, None, None, None],
            torch.arange(c)[None, :, None, None],
            ys[:, None, :, None],
            xs[:, None, None, :],
        ]
        images = images + cls.NOISE * torch.randn(n, c, s, s, generator=gen)
        return images, labels

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        """Templates, then train, then val samples, all from one generator seeded by the class count and size."""
        gen = torch.Generator().manual_seed(cls.SEED + cfg.num_classes * 1000 + cfg.image_size)
        s = cfg.image_size
        coarse = torch.randn(cfg.num_classes, 3, max(2, s // 8), max(2, s // 8), generator=gen)
        templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        train_x, train_y = cls._make(templates, cfg.train_size, gen)
        val_x, val_y = cls._make(templates, cfg.val_size, gen)
        # Normalisation of the raw values (none of its own: mean 0, std 1), moved onto the uint8 scale.
        lo, span = cls.RANGE[0], cls.RANGE[1] - cls.RANGE[0]
        mean, std = _norm(cfg, (0.0,) * 3, (1.0,) * 3)
        train_t, val_t = _pad_crop_flip(
            tuple((m - lo) / span for m in mean), tuple(v / span for v in std), 0, cfg.augment
        )
        return DataBundle(
            MemoryImages(cls._quantise(train_x), train_y, train_t),
            MemoryImages(cls._quantise(val_x), val_y, val_t),
            cfg.num_classes,
            (3, s, s),
        )

    @classmethod
    def _quantise(cls, images: torch.Tensor) -> torch.Tensor:
        """Raw values as uint8 over RANGE (steps of 0.08 against noise of std 2; 1 value in 20000 is clipped)."""
        lo, hi = cls.RANGE
        return ((images.clamp(lo, hi) - lo) * (255 / (hi - lo))).round().to(torch.uint8)


def _torchvision_pair(tv_class: type, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Train and test splits of a torchvision data set; missing or damaged files become one ConfigError line."""
    try:
        return tuple(tv_class(str(cfg.root), train=t, download=cfg.download) for t in (True, False))
    except _LOAD_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"data.root: the {cfg.name} files under {cfg.root!r} cannot be read ({reason}); fix them, or set "
            "data.download=true"
        ) from None


class _Cifar:
    """torchvision's CIFAR files under data.root, or (CIFAR-10) an ImageFolder tree root/train, root/test."""

    tv_class: type = datasets.CIFAR10
    folder_name = "cifar-10-batches-py"
    classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    image_folder = True
    takes_pretrained = ("mean", "std")  # what a pretrained model's preprocessing may set (32x32 in memory)

    @classmethod
    def _is_folder(cls, root: Path) -> bool:
        return cls.image_folder and (root / "train").is_dir() and (root / "test").is_dir()

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        """data.root must be set, and hold the files unless data.download is on; nothing is read."""
        _check_subset(cfg)
        _check_norm(cfg, 3)
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
        """Both splits as uint8 tensors in memory; transforms run per sample on tensors."""
        root = _require_root(cfg, f"{cfg.name} ({cls.folder_name}/)")
        train_t, val_t = _pad_crop_flip(*_norm(cfg, cls.mean, cls.std), 4, cfg.augment)
        if cls._is_folder(root) and not (root / cls.folder_name).is_dir():
            (tx, ty, classes), (vx, vy, val_classes) = decode_folder(root / "train"), decode_folder(root / "test")
            if classes != val_classes:
                raise ConfigError(
                    f"data.root: {str(root)!r} has different class folders in train/ ({len(classes)}) and test/ "
                    f"({len(val_classes)}); they must match"
                )
            if tuple(tx.shape[1:]) != (3, 32, 32) or tuple(vx.shape[1:]) != (3, 32, 32):
                raise ConfigError(
                    f"data.root: {cfg.name} images must be 32x32 RGB, {str(root)!r} has {tuple(tx.shape[1:])}; "
                    "for other sizes use data.name=imagefolder (train/ and val/)"
                )
            return DataBundle(MemoryImages(tx, ty, train_t), MemoryImages(vx, vy, val_t), len(classes), (3, 32, 32))
        train, val = _torchvision_pair(cls.tv_class, cfg)

        def to_chw(a) -> torch.Tensor:
            return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

        return DataBundle(
            MemoryImages(to_chw(train.data), torch.tensor(train.targets), train_t),
            MemoryImages(to_chw(val.data), torch.tensor(val.targets), val_t),
            cls.classes,
            (3, 32, 32),
        )


@register_dataset("cifar10")
class Cifar10(_Cifar):
    """CIFAR-10: torchvision's cifar-10-batches-py/, or an ImageFolder tree of 32x32 images (train/, test/)."""


@register_dataset("cifar100")
class Cifar100(_Cifar):
    """CIFAR-100 (fine labels): torchvision's cifar-100-python/."""

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
        """data.root must be set, and hold FashionMNIST/raw/ unless data.download is on."""
        _check_subset(cfg)
        _check_norm(cfg, 1)
        root = _require_root(cfg, "FashionMNIST/raw/")
        if not cfg.download and not (root / "FashionMNIST" / "raw").is_dir():
            raise ConfigError(
                f"data.root: no FashionMNIST/raw/ at {str(root)!r}; fix data.root, or set data.download=true "
                "to fetch it"
            )

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        """Both splits as uint8 tensors (N, 1, 28, 28); pad-2 crop and flip for training when augmenting."""
        train_t, val_t = _pad_crop_flip(*_norm(cfg, FASHION_MNIST_MEAN, FASHION_MNIST_STD), 2, cfg.augment)
        train, val = _torchvision_pair(datasets.FashionMNIST, cfg)
        return DataBundle(
            MemoryImages(train.data[:, None], train.targets, train_t),
            MemoryImages(val.data[:, None], val.targets, val_t),
            10,
            (1, 28, 28),
        )


@register_dataset("imagefolder")
class ImageFolderData:
    """ImageNet layout: root/train/<class>/*, root/val/<class>/*; crops of data.image_size (224 when left at 32)."""

    takes_pretrained = ("mean", "std", "size", "resize")

    @classmethod
    def validate(cls, cfg: DataConfig) -> None:
        """data.root must exist with train/ and val/ folders; no image is opened."""
        _check_subset(cfg)
        _check_norm(cfg, 3)
        root = _require_root(cfg, "train/ and val/ class folders")
        if not root.is_dir():
            raise ConfigError(f"data.root: no directory at {str(root)!r}; it must hold train/ and val/ class folders")
        missing = [f"{d}/" for d in ("train", "val") if not (root / d).is_dir()]
        if missing:
            raise ConfigError(f"data.root: {str(root)!r} has no {' or '.join(missing)} folder (ImageNet layout)")

    @classmethod
    def build(cls, cfg: DataConfig) -> DataBundle:
        """Images decoded per sample from disk: RandomResizedCrop + flip for training, resize + centre crop for val."""
        root = _require_root(cfg, "train/ and val/ class folders")
        size = 224 if cfg.image_size == 32 else cfg.image_size
        norm = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(*_norm(cfg, IMAGENET_MEAN, IMAGENET_STD)),
            v2.ToPureTensor(),
        ]
        resize = [v2.Resize(cfg.eval_resize or size + size // 7), v2.CenterCrop(size)]  # 256 then 224
        aug = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()] if cfg.augment else resize
        try:
            train = datasets.ImageFolder(str(root / "train"), v2.Compose([*aug, *norm]), loader=load_image)
            val = datasets.ImageFolder(str(root / "val"), v2.Compose([*resize, *norm]), loader=load_image)
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"data.root: {' '.join(str(exc).split())}") from None
        if train.classes != val.classes:
            raise ConfigError(
                f"data.root: {str(root)!r} has different class folders in train/ ({len(train.classes)}) and val/ "
                f"({len(val.classes)}); they must match"
            )
        return DataBundle(train, val, len(train.classes), (3, size, size))
