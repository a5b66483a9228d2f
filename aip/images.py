"""Image files: a loader that names the file it cannot decode, and the decoded-folder cache keyed by the tree.

A damaged image (truncated, bit-flipped, not an image at all) must stop a run with one line naming the file, not
with a traceback from PIL's internals in the middle of an epoch: `load_image` raises `DataError`, which the entry
point prints as `error: ...`. Folder trees of small images are decoded once into a uint8 tensor cached on disk; the
cache key covers every file's path, size and modification time, so a changed tree is decoded again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2
from tqdm.auto import tqdm

from aip.config import ConfigError


class DataError(RuntimeError):
    """A data file that cannot be used (an image that does not decode); the message names the file.

    A DataLoader worker's exception comes back re-raised with the worker's traceback in its message; `str` keeps
    only the original one line.
    """

    def __str__(self) -> str:
        text = super().__str__()
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in text and marker in text:
            text = text.rsplit(marker, 1)[1]
        return " ".join(text.split())


def load_image(path: str) -> Image.Image:
    """An RGB image from `path`, fully decoded now; any failure is a DataError naming the file."""
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib errors...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot decode image {path!r} ({reason}); replace or remove the file") from None


def tree_key(root: Path) -> str:
    """A digest of the tree's absolute path and every file's relative path, size and modification time; a file that
    cannot be read (a broken link) is a DataError naming it."""
    root = Path(root).resolve()
    digest = hashlib.sha256(str(root).encode())
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            file = os.path.join(folder, name)
            try:
                stat = os.stat(file)
            except OSError as exc:  # a broken symbolic link, a file removed meanwhile, no permission
                reason = exc.strerror or type(exc).__name__
                raise DataError(f"cannot read {file!r} ({reason}: a broken link?); replace or remove it") from None
            rel = os.path.relpath(file, root)
            entries.append(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}")
    digest.update("\n".join(sorted(entries)).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where decoded data sets are cached: $AIP_CACHE_DIR, else ~/.cache/aip."""
    return Path(os.environ.get("AIP_CACHE_DIR", Path.home() / ".cache" / "aip"))


def decode_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode an ImageFolder tree of equal-sized images once into a uint8 tensor, cached on disk.

    The cache file (`imagefolder-<key>.pt` under $AIP_CACHE_DIR or ~/.cache/aip) is keyed by `tree_key`: adding,
    removing, renaming or rewriting an image makes a new key, and the tree is decoded again.
    """
    path = cache_dir() / f"imagefolder-{tree_key(root)}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["images"], blob["labels"], blob["classes"]
        except Exception:  # noqa: BLE001 - any unreadable cache (an interrupted copy, say) is rebuilt below
            pass
    try:
        folder = datasets.ImageFolder(str(root), loader=load_image)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"data.root: {' '.join(str(exc).split())}") from None
    to_tensor = v2.PILToTensor()
    images = []
    for file, _ in tqdm(folder.samples, desc=f"decoding {root} (once, then cached)", leave=False, disable=None):
        image = to_tensor(folder.loader(file))
        if images and image.shape != images[0].shape:
            raise ConfigError(
                f"data.root: images under {str(root)!r} differ in size ({tuple(images[0].shape)} and "
                f"{tuple(image.shape)} at {file!r}); this loader needs equal sizes, data.name=imagefolder resizes"
            )
        images.append(image)
    blob = {"images": torch.stack(images), "labels": torch.tensor(folder.targets), "classes": folder.classes}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel ranks may decode at once
    torch.save(blob, tmp)
    tmp.replace(path)
    return blob["images"], blob["labels"], blob["classes"]
