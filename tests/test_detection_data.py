"""Detection data: the synthetic set, seeded box-aware augmentation, Penn-Fudan (real files when present), VOC and
COCO layouts written on the fly, and one-line errors for wrong roots and options."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from aip.errors import ConfigError
from aip.tasks.detection.datasets import build_detection_data
from aip.tasks.detection.sources import VOC_CLASSES, pennfudan_boxes_from_annotation, pennfudan_boxes_from_mask
from aip.tasks.detection.synthetic import COLOURS
from aip.tasks.detection.transforms import collate

PENNFUDAN_TAR = Path("/work/shared/data/pennfudan.tar")


def _write(image: torch.Tensor, path: Path) -> None:
    """A (C, H, W) or (H, W) uint8 tensor as an image file."""
    array = image.permute(1, 2, 0).numpy() if image.dim() == 3 else image.numpy()
    Image.fromarray(array).save(path)


def test_synthetic_set_is_seeded_and_its_boxes_hold_the_class_colour() -> None:
    a = build_detection_data("synthetic", image_size=48, augment=False, num_classes=4, train_size=8, val_size=4)
    b = build_detection_data("synthetic", image_size=48, augment=False, num_classes=4, train_size=8, val_size=4)
    assert a.num_classes == 5
    assert a.class_names[1:] == ["red rectangle", "green ellipse", "blue rectangle", "yellow ellipse"]
    assert len(a.train) == 8 and len(a.val) == 4
    for i in range(8):
        (x, t), (y, u) = a.train[i], b.train[i]
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(t["boxes"], u["boxes"])
        assert x.dtype == torch.float32 and x.shape == (3, 48, 48) and 0 <= x.min() and x.max() <= 1
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all() and (t["boxes"] <= 48).all()
        assert ((1 <= t["labels"]) & (t["labels"] <= 4)).all()
    image, target = a.train.sample(0)  # the last object drawn is on top: its centre has its class colour
    x1, y1, x2, y2 = target["boxes"][-1].round().int().tolist()
    centre = image[:, (y1 + y2) // 2 - 1 : (y1 + y2) // 2 + 2, (x1 + x2) // 2 - 1 : (x1 + x2) // 2 + 2].float()
    colour = torch.tensor(list(COLOURS.values())[int(target["labels"][-1]) - 1]).float()
    assert (centre.mean(dim=(1, 2)) - colour).abs().max() < 40
    assert not torch.equal(a.val[0][0], a.train[0][0])


def test_flips_move_the_boxes_are_seeded_per_sample_and_change_with_the_epoch() -> None:
    data = build_detection_data("synthetic", image_size=32, seed=5, train_size=32, val_size=2)
    state = torch.random.get_rng_state()
    first = [data.train[i] for i in range(32)]
    again = [data.train[i] for i in reversed(range(32))][::-1]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    flipped = 0
    for i, ((x, t), (y, _)) in enumerate(zip(first, again, strict=True)):
        torch.testing.assert_close(x, y)
        raw, raw_t = data.train.sample(i)
        plain = raw.float() / 255
        if torch.allclose(x, plain.flip(-1)) and not torch.allclose(x, plain):
            flipped += 1
            expected = torch.stack([32 - raw_t["boxes"][:, 2], raw_t["boxes"][:, 1], 32 - raw_t["boxes"][:, 0]], 1)
            torch.testing.assert_close(t["boxes"][:, :3], expected)
        else:
            torch.testing.assert_close(x, plain)
    assert 8 <= flipped <= 24
    data.train.set_epoch(1)
    assert any(not torch.equal(data.train[i][0], first[i][0]) for i in range(32))
    val = [data.val[0][0], data.val[0][0]]
    torch.testing.assert_close(val[0], data.val.sample(0)[0].float() / 255)  # no flips for validation


def test_collate_keeps_images_of_different_sizes_as_lists() -> None:
    a = (torch.zeros(3, 10, 12), {"boxes": torch.zeros(1, 4), "labels": torch.ones(1)})
    b = (torch.zeros(3, 7, 5), {"boxes": torch.zeros(0, 4), "labels": torch.ones(0)})
    images, targets = collate([a, b])
    assert [tuple(i.shape) for i in images] == [(3, 10, 12), (3, 7, 5)] and targets[1] is b[1]


@pytest.fixture(scope="module")
def pennfudan_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not PENNFUDAN_TAR.is_file():
        pytest.skip(f"{PENNFUDAN_TAR} not present")
    out = tmp_path_factory.mktemp("pennfudan")
    with tarfile.open(PENNFUDAN_TAR) as tar:
        tar.extractall(out, filter="data")
    return out / "PennFudanPed"


def test_pennfudan_split_and_annotation_boxes_agree_with_the_masks(pennfudan_root: Path) -> None:
    data = build_detection_data("pennfudan", pennfudan_root, image_size=128)
    assert (len(data.train), len(data.val), data.num_classes) == (120, 50, 2)
    assert data.class_names == ["__background__", "person"]
    train = {r.image.name for r in data.train.records}
    val = {r.image.name for r in data.val.records}
    assert not train & val and len(train | val) == 170
    again = build_detection_data("pennfudan", pennfudan_root)
    assert [r.image.name for r in again.val.records] == sorted(val)
    objects = exact = 0
    for rec in data.train.records + data.val.records:
        from_mask = pennfudan_boxes_from_mask(pennfudan_root / "PedMasks" / f"{rec.image.stem}_mask.png")
        assert from_mask.shape == rec.boxes.shape
        assert box_iou(rec.boxes, from_mask).diagonal().min() > 0.9
        objects += len(rec.boxes)
        exact += int((rec.boxes == from_mask).all(dim=1).sum())
    assert objects == 423 and exact > 380
    image, target = data.train[0]
    assert max(image.shape[-2:]) == 128 and target["boxes"].canvas_size == tuple(image.shape[-2:])


def test_pennfudan_reads_boxes_from_the_masks_where_an_annotation_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "PennFudanPed"
    for sub in ("PNGImages", "PedMasks", "Annotation"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        _write(torch.full((3, 40, 50), 90, dtype=torch.uint8), root / "PNGImages" / f"P{i}.png")
        mask = torch.zeros(40, 50, dtype=torch.uint8)
        mask[5:20, 3:11] = 1
        mask[10:38, 30:45] = 2
        _write(mask, root / "PedMasks" / f"P{i}_mask.png")
    line = 'Bounding box for object 1 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : (4, 6) - (11, 20)\n'
    (root / "Annotation" / "P0.txt").write_text(line)
    data = build_detection_data("pennfudan", root, val_size=1, seed=3)
    records = {r.image.stem: r for r in data.train.records + data.val.records}
    torch.testing.assert_close(records["P0"].boxes, torch.tensor([[3.0, 5.0, 11.0, 20.0]]))
    torch.testing.assert_close(records["P1"].boxes, torch.tensor([[3.0, 5.0, 11.0, 20.0], [30.0, 10.0, 45.0, 38.0]]))
    torch.testing.assert_close(pennfudan_boxes_from_annotation(root / "Annotation" / "P0.txt"), records["P0"].boxes)


def _voc(root: Path) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    objects = {
        "a": [("dog", (11, 21, 40, 50), 0), ("person", (1, 1, 20, 30), 1)],
        "b": [("tvmonitor", (5, 5, 25, 15), 0)],
        "c": [("car", (2, 3, 30, 20), 1)],
    }
    for name, objs in objects.items():
        _write(torch.full((3, 60, 64), 128, dtype=torch.uint8), root / "JPEGImages" / f"{name}.jpg")
        xml = "".join(
            f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for c, b, d in objs
        )
        (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{xml}</annotation>")
    (root / "ImageSets/Main/train.txt").write_text("a\nb\n")
    (root / "ImageSets/Main/val.txt").write_text("a\nc\n")


def test_voc_layout_maps_the_twenty_classes_and_ignores_difficult_objects(tmp_path: Path) -> None:
    _voc(tmp_path)
    data = build_detection_data("voc", tmp_path, augment=False)
    assert data.num_classes == 21 and data.class_names[1:] == list(VOC_CLASSES)
    _, target = data.train[0]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]  # the difficult person is not trained on
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 20.0, 40.0, 50.0]]))
    _, target = data.val[0]
    assert target["labels"].tolist() == [12, 15] and target["iscrowd"].tolist() == [0, 1]
    _, target = data.train[1]
    assert target["labels"].tolist() == [20]
    with pytest.raises(ConfigError, match="ImageSets/Main/test.txt"):
        build_detection_data("voc", tmp_path, val_split="test")


def test_coco_layout_maps_category_ids_to_contiguous_labels_and_skips_crowds_in_training(tmp_path: Path) -> None:
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        _write(torch.full((3, 50, 60), 100, dtype=torch.uint8), tmp_path / split / "1.jpg")
    (tmp_path / "annotations").mkdir()
    doc = {
        "images": [{"id": 7, "file_name": "1.jpg", "width": 60, "height": 50}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"image_id": 7, "category_id": 18, "bbox": [10, 5, 20, 30], "iscrowd": 0},
            {"image_id": 7, "category_id": 3, "bbox": [30, 20, 25, 25], "iscrowd": 1},
            {"image_id": 7, "category_id": 3, "bbox": [1, 2, 8, 9], "iscrowd": 0},
        ],
    }
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    data = build_detection_data("coco", tmp_path, augment=False)
    assert data.num_classes == 3 and data.class_names == ["__background__", "car", "dog"]
    _, target = data.train[0]
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [0, 0]
    expected = torch.tensor([[10.0, 5, 30, 35], [1, 2, 9, 11]])
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
    _, target = data.val[0]
    assert target["labels"].tolist() == [2, 1, 1] and target["iscrowd"].tolist() == [0, 1, 0]
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a COCO instances file"):
        build_detection_data("coco", tmp_path)


@pytest.mark.parametrize(
    ("name", "root", "options", "message"),
    [
        ("pennfudan", None, {}, "data.root: required for data.name=pennfudan; set it to the extracted PennFudanPed/"),
        ("pennfudan", "/nonexistent/x", {}, "is not a directory; data.name=pennfudan expects the extracted"),
        ("voc", "{tmp}", {}, "no Annotations/ under"),
        ("coco", "{tmp}", {}, "no image folder train2017/"),
        ("synthetic", None, {"classes": 3}, "synthetic has no option classes; it takes num_classes"),
        ("synthetic", None, {"num_classes": 13}, "1 to 12 object classes"),
    ],
)
def test_wrong_roots_and_options_are_one_line_errors(
    tmp_path: Path, name: str, root: str | None, options: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        build_detection_data(name, None if root is None else root.format(tmp=tmp_path), **options)
    assert "\n" not in str(info.value)


def _pennfudan(root: Path, count: int) -> Path:
    """A Penn-Fudan layout of `count` small images, each with one pedestrian in its mask (no annotation files)."""
    for sub in ("PNGImages", "PedMasks", "Annotation"):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        _write(torch.full((3, 20, 24), 10 * i, dtype=torch.uint8), root / "PNGImages" / f"P{i:02d}.png")
        mask = torch.zeros(20, 24, dtype=torch.uint8)
        mask[2:18, i % 10 : i % 10 + 6] = 1
        _write(mask, root / "PedMasks" / f"P{i:02d}_mask.png")
    return root


def _names(dataset: object) -> list[str]:
    return [r.image.name for r in dataset.records]


def test_pennfudan_split_is_the_same_at_every_run_seed(tmp_path: Path) -> None:
    root = _pennfudan(tmp_path / "PennFudanPed", 12)
    runs = [build_detection_data("pennfudan", root, seed=seed, val_size=5) for seed in (0, 1, 7)]
    assert len(set(_names(runs[0].val))) == 5 and not set(_names(runs[0].train)) & set(_names(runs[0].val))
    for other in runs[1:]:
        assert _names(other.val) == _names(runs[0].val)  # a teacher of seed 0 never validates on its training images
        assert _names(other.train) == _names(runs[0].train)


def test_synthetic_draws_are_the_same_at_every_run_seed_and_only_the_flips_change() -> None:
    a, b = (build_detection_data("synthetic", image_size=32, seed=s, train_size=16, val_size=4) for s in (0, 1))
    for i in range(16):
        torch.testing.assert_close(a.train.sample(i), b.train.sample(i))
    torch.testing.assert_close(a.val[0], b.val[0])
    assert any(not torch.equal(a.train[i][0], b.train[i][0]) for i in range(16))  # augmentation follows the seed


def test_train_subset_keeps_the_same_seeded_choice_at_every_run_seed(tmp_path: Path) -> None:
    root = _pennfudan(tmp_path / "PennFudanPed", 12)
    full = build_detection_data("pennfudan", root, val_size=4)
    kept = [build_detection_data("pennfudan", root, seed=seed, subset=5, val_size=4) for seed in (0, 1)]
    assert len(kept[0].train) == 5 and _names(kept[1].train) == _names(kept[0].train)
    assert set(_names(kept[0].train)) < set(_names(full.train)) and _names(kept[0].val) == _names(full.val)
    assert _names(kept[0].train) != _names(full.train)[:5]  # a random choice, not the first five
    whole = build_detection_data("synthetic", image_size=32, train_size=16, val_size=2)
    part = build_detection_data("synthetic", image_size=32, seed=3, subset=6, train_size=16, val_size=2)
    drawn = [whole.train.sample(i)[0] for i in range(16)]
    picked = [next(i for i, x in enumerate(drawn) if torch.equal(x, part.train.sample(j)[0])) for j in range(6)]
    assert len(part.train) == 6 and picked == sorted(set(picked)) and picked != list(range(6))
    part.train.set_epoch(1)
    assert part.train[0][0].shape == (3, 32, 32)
