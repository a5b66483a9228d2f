"""Detection data sets read from disk: Penn-Fudan pedestrians, Pascal VOC (VOCdevkit layout) and COCO (JSON).

Each builder reads the annotations once into `Record`s (boxes XYXY in pixels, labels 1..K) and leaves the images
on disk; a missing or malformed layout is a one-line ConfigError that says what was expected.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from aip.errors import ConfigError
from aip.tasks.detection.data import (
    BACKGROUND,
    DetectionData,
    DetectionSet,
    Record,
    SeededTransform,
    register_detection_dataset,
    require_dir,
    split_indices,
)

PENNFUDAN_LAYOUT = "the extracted PennFudanPed/ folder (PNGImages/, PedMasks/, Annotation/)"
# "... (Xmin, Ymin) - (Xmax, Ymax) : (160, 182) - (302, 431)"; 1-based, inclusive corners.
_PENNFUDAN_BOX = re.compile(r"\(Xmax, Ymax\)\s*:\s*\((\d+),\s*(\d+)\)\s*-\s*\((\d+),\s*(\d+)\)")

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_LAYOUT = "a VOC year folder (e.g. VOCdevkit/VOC2007) with Annotations/*.xml, JPEGImages/, ImageSets/Main/"


def _splits(records: list[Record], val_size: int, seed: int) -> tuple[list[Record], list[Record]]:
    train_idx, val_idx = split_indices(len(records), val_size, seed)
    return [records[i].without_ignored() for i in train_idx], [records[i] for i in val_idx]


def _boxes(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def pennfudan_boxes_from_mask(mask_path: Path) -> torch.Tensor:
    """One XYXY box per instance id of a Penn-Fudan mask (0 is background), in id order; x2, y2 exclusive."""
    with Image.open(mask_path) as file:
        mask = pil_to_tensor(file)[0]
    rows = []
    for instance in mask.unique().tolist():
        if instance == 0:
            continue
        ys, xs = torch.nonzero(mask == instance, as_tuple=True)
        rows.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return _boxes(rows)


def pennfudan_boxes_from_annotation(path: Path) -> torch.Tensor:
    """The boxes of a Penn-Fudan annotation file, from its 1-based inclusive corners to XYXY with exclusive ends."""
    found = _PENNFUDAN_BOX.findall(path.read_text(encoding="latin-1"))
    return _boxes([[int(x1) - 1, int(y1) - 1, int(x2), int(y2)] for x1, y1, x2, y2 in found])


@register_detection_dataset("pennfudan")
def pennfudan(
    root: str | Path | None,
    train_transform: SeededTransform,
    val_transform: SeededTransform,
    seed: int = 0,
    val_size: int = 50,
) -> DetectionData:
    """Penn-Fudan pedestrians (170 images): one class, a random split of `val_size` validation images by `seed`
    (`build_detection_data` passes the constant DATA_SEED, so every run of any seed gets the same split).

    Boxes come from Annotation/<image>.txt, or from the instance mask where the annotation file is missing.
    """
    root = require_dir(root, "pennfudan", PENNFUDAN_LAYOUT)
    images = sorted((root / "PNGImages").glob("*.png"))
    if not images:
        raise ConfigError(f"data.root: no PNGImages/*.png under {str(root)!r}; pennfudan expects {PENNFUDAN_LAYOUT}")
    records = []
    for image in images:
        annotation = root / "Annotation" / f"{image.stem}.txt"
        mask = root / "PedMasks" / f"{image.stem}_mask.png"
        if annotation.is_file():
            boxes = pennfudan_boxes_from_annotation(annotation)
        elif mask.is_file():
            boxes = pennfudan_boxes_from_mask(mask)
        else:
            missing = f"neither Annotation/{annotation.name} nor PedMasks/{mask.name}"
            raise ConfigError(f"data.root: {image.name} has {missing}")
        n = len(boxes)
        records.append(Record(image, boxes, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)))
    train, val = _splits(records, val_size, seed)
    return DetectionData(
        DetectionSet(train, train_transform), DetectionSet(val, val_transform), 2, [BACKGROUND, "person"]
    )


def _voc_record(root: Path, image_id: str, classes: dict[str, int]) -> Record:
    """One VOC image's objects: pixel corners (1-based, inclusive) to XYXY; `difficult` ones flagged as ignored."""
    path = root / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(path).getroot()
        rows, labels, flags = [], [], []
        for obj in tree.iter("object"):
            name = obj.findtext("name", "").strip()
            if name not in classes:
                raise ConfigError(f"data.root: {path.name} has an object of unknown class {name!r}")
            box = obj.find("bndbox")
            x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            rows.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(classes[name])
            flags.append(int(obj.findtext("difficult", "0").strip() or 0))
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"data.root: cannot read {path} ({type(exc).__name__}: {exc})") from None
    image = root / "JPEGImages" / f"{image_id}.jpg"
    return Record(image, _boxes(rows), torch.tensor(labels).long(), torch.tensor(flags).long())


def _voc_split(root: Path, split: str, classes: dict[str, int]) -> list[Record]:
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise ConfigError(f"data.root: no ImageSets/Main/{split}.txt under {str(root)!r}; voc expects {VOC_LAYOUT}")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    return [_voc_record(root, i, classes) for i in ids]


@register_detection_dataset("voc")
def voc(
    root: str | Path | None,
    train_transform: SeededTransform,
    val_transform: SeededTransform,
    seed: int = 0,
    train_split: str = "train",
    val_split: str = "val",
) -> DetectionData:
    """Pascal VOC: the 20 classes, ImageSets/Main/{train_split,val_split}.txt; difficult objects ignored."""
    root = require_dir(root, "voc", VOC_LAYOUT)
    for sub in ("Annotations", "JPEGImages"):
        if not (root / sub).is_dir():
            raise ConfigError(f"data.root: no {sub}/ under {str(root)!r}; voc expects {VOC_LAYOUT}")
    classes = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    train = [r.without_ignored() for r in _voc_split(root, train_split, classes)]
    val = _voc_split(root, val_split, classes)
    return DetectionData(
        DetectionSet(train, train_transform), DetectionSet(val, val_transform), 21, [BACKGROUND, *VOC_CLASSES]
    )


def _coco_split(root: Path, images: str, annotations: str) -> tuple[list[Record], list[tuple[int, str]]]:
    """The records of one COCO split (labels are still category ids) and its (id, name) categories."""
    path, folder = root / annotations, root / images
    if not folder.is_dir():
        raise ConfigError(f"data.root: no image folder {images}/ under {str(root)!r} (coco expects {COCO_LAYOUT})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        categories = [(int(c["id"]), str(c["name"])) for c in data["categories"]]
        objects: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            objects.setdefault(int(ann["image_id"]), []).append(ann)
        records = []
        for img in data["images"]:
            anns = objects.get(int(img["id"]), [])
            rows = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            labels = torch.tensor([int(a["category_id"]) for a in anns]).long()
            crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns]).long()
            records.append(Record(folder / img["file_name"], _boxes(rows), labels, crowd))
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"data.root: cannot read {path} ({reason}); coco expects {COCO_LAYOUT}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"data.root: {path} is not a COCO instances file ({type(exc).__name__}: {exc})") from None
    return records, categories


COCO_LAYOUT = "images/ folders and instances JSON files, e.g. train2017/, val2017/, annotations/instances_*.json"


@register_detection_dataset("coco")
def coco(
    root: str | Path | None,
    train_transform: SeededTransform,
    val_transform: SeededTransform,
    seed: int = 0,
    train_images: str = "train2017",
    train_annotations: str = "annotations/instances_train2017.json",
    val_images: str = "val2017",
    val_annotations: str = "annotations/instances_val2017.json",
) -> DetectionData:
    """COCO instances: category ids mapped, in id order, to labels 1..K; crowd boxes left out of training and
    kept as ignore regions for validation."""
    root = require_dir(root, "coco", COCO_LAYOUT)
    train, categories = _coco_split(root, train_images, train_annotations)
    val, val_categories = _coco_split(root, val_images, val_annotations)
    if sorted(categories) != sorted(val_categories):
        raise ConfigError(f"data.root: {train_annotations} and {val_annotations} list different categories")
    ordered = sorted(categories)
    to_label = {cid: i + 1 for i, (cid, _) in enumerate(ordered)}
    for rec in train + val:
        unknown = set(rec.labels.tolist()) - set(to_label)
        if unknown:
            raise ConfigError(f"data.root: {rec.image.name} has objects of unlisted category ids {sorted(unknown)}")
        rec.labels = torch.tensor([to_label[c] for c in rec.labels.tolist()]).long()
    return DetectionData(
        DetectionSet([r.without_ignored() for r in train], train_transform),
        DetectionSet(val, val_transform),
        len(ordered) + 1,
        [BACKGROUND, *(name for _, name in ordered)],
    )
