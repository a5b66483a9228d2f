"""Detector builders (no downloads, sizes, user import paths, one-line errors) and the prunable view's contract."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn

from aip.errors import ConfigError
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner
from aip.registry import UnknownNameError
from aip.tasks.detection.models import TinyBackbone, create_detector
from aip.tasks.detection.prunable import PrunableDetector, fixed_boxes, head_layers
from aip.tasks.detection.taps import detection_taps


@pytest.mark.parametrize(
    ("name", "size", "outputs"),
    [
        ("tiny_ssd", 64, 6),
        ("ssdlite320_mobilenet_v3_large", 96, 12),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", 96, 6 + 2 * 6),
        ("retinanet_resnet50_fpn", 64, 10),
    ],
)
def test_builders_size_the_transform_and_the_view_returns_raw_head_outputs(name: str, size: int, outputs: int) -> None:
    detector = create_detector(name, 4, size)
    assert detector.transform.min_size == (size,) and detector.transform.max_size == size
    view = PrunableDetector(detector, rois_per_image=6)
    example = view.batch([torch.rand(3, size + 10, size)])
    assert example.shape[0] == 1 and max(example.shape[-2:]) <= size + 32
    out = view.eval()(example)
    assert len(out) == outputs and all(isinstance(t, torch.Tensor) for t in out)
    heads = head_layers(detector)
    produced = {t.shape[1] if t.dim() == 4 else t.shape[-1] for t in out}
    assert {m.weight.shape[0] for m in heads} == produced  # every output is some head layer's, channels intact
    detector_params = dict(detector.named_parameters())
    for pname, p in view.named_parameters():  # the same modules under the same names: histories replay on either
        assert detector_params[pname] is p
    assert set(view.state_dict()) <= set(detector.state_dict())


def test_class_scores_count_the_background() -> None:
    detector = create_detector("ssdlite320_mobilenet_v3_large", 5, 96)
    outputs = PrunableDetector(detector).eval()(torch.rand(1, 3, 96, 96))
    anchors = detector.anchor_generator.num_anchors_per_location()[0]
    assert outputs[0].shape[1] == 5 * anchors and outputs[1].shape[1] == 4 * anchors


def test_size_limits_downloads_and_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="ssd300_vgg16 needs images of at least 268 px"):
        create_detector("ssd300_vgg16", 3, 200)
    with pytest.raises(ConfigError, match="model.kwargs.weights_backbone: .* built without downloads"):
        create_detector("ssdlite320_mobilenet_v3_large", 3, 96, weights_backbone="DEFAULT")
    with pytest.raises(ConfigError, match="model.kwargs: tiny_ssd does not take them"):
        create_detector("tiny_ssd", 3, 64, depth=3)
    with pytest.raises(ConfigError, match="the background and at least one class"):
        create_detector("tiny_ssd", 1, 64)
    with pytest.raises(UnknownNameError, match="fasterrcnn_mobilenet_v3_large_320_fpn"):
        create_detector("yolo", 3, 64)


USER_MODULE = """
from aip.tasks.detection.models import create_detector

def build(num_classes, width=8):
    return create_detector("tiny_ssd", num_classes, 64, width=width)
"""


def test_a_users_detector_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_detectors.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_detectors", raising=False)
    detector = create_detector("my_detectors:build", 3, width=16)
    assert detector.head.classification_head.module_list[0].out_channels == 3 * 4
    assert detector.backbone.stage1[0].out_channels == 16
    with pytest.raises(ConfigError, match="has no attribute 'nothing'"):
        create_detector("my_detectors:nothing", 3)


class OwnDetector(nn.Module):
    """A detector outside torchvision's families that states its own prunable forward and head layers."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = TinyBackbone(16)
        self.cls = nn.Conv2d(16, 6, 3, padding=1)

    def prunable_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.cls(f) for f in self.backbone(images).values())

    def head_layers(self) -> list[nn.Module]:
        return [self.cls]


def test_other_detectors_prune_through_their_own_prunable_forward_or_are_refused() -> None:
    detector = OwnDetector()
    view = PrunableDetector(detector).eval()
    example = torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = ChannelPruner(view, example, head_layers(detector))
        pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert detector.backbone.stage3[0].out_channels < 16 and detector.cls.out_channels == 6
    assert [t.shape[1] for t in detector.prunable_forward(example)] == [6, 6, 6]
    with pytest.raises(ConfigError, match="cannot prune a Sequential: give it prunable_forward"):
        PrunableDetector(nn.Sequential(nn.Conv2d(3, 3, 1)))
    mask_rcnn = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    with pytest.raises(ConfigError, match="mask or keypoint heads"):
        head_layers(mask_rcnn)
    with pytest.raises(ValueError, match=r"expected a batch of images \(N, C, H, W\)"):
        view(example[0])


def test_fixed_boxes_lie_inside_the_image_and_come_in_three_sizes() -> None:
    boxes = fixed_boxes(60, 80, 9)
    assert boxes.shape == (9, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert len({round(float(w), 3) for w in boxes[:3, 2] - boxes[:3, 0]}) == 3


@pytest.mark.parametrize(
    ("name", "size", "taps"),
    [
        ("tiny_ssd", 64, ["backbone.stage1", "backbone.stage2", "backbone.stage3"]),
        (
            "ssdlite320_mobilenet_v3_large",
            128,
            ["backbone.features.0", "backbone.features.1", "backbone.extra.0", "backbone.extra.1"],
        ),
        # the FPN's third level is a max pool of the second, made by no module
        ("fasterrcnn_mobilenet_v3_large_320_fpn", 128, ["backbone.fpn.layer_blocks.0", "backbone.fpn.layer_blocks.1"]),
        (
            "retinanet_resnet50_fpn",
            128,
            [f"backbone.fpn.layer_blocks.{i}" for i in range(3)] + ["backbone.fpn.extra_blocks.p6"],
        ),
    ],
)
def test_default_taps_are_the_modules_that_make_the_feature_levels(name: str, size: int, taps: list[str]) -> None:
    detector = create_detector(name, 3, size).train()
    assert detection_taps(detector, size) == taps
    assert detector.training
    modules = dict(detector.named_modules())
    assert all(t in modules for t in taps)


def test_a_backbone_without_module_made_levels_has_no_default_taps() -> None:
    detector = OwnDetector()
    detector.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # one level only
    with pytest.raises(ValueError, match="cannot find two feature levels .* set model.taps"):
        detection_taps(detector, 32)
