"""Detectors: torchvision's builders (never with weights: nothing is downloaded), a tiny SSD for tests and demos,
and a user's detector by import path `package.module:callable`.

`num_classes` counts the background, as torchvision expects. `image_size` sets the size the detector's own
transform resizes to: SSD-style models get a fixed square input, R-CNN-style ones min_size = max_size = image_size
(overridable through kwargs).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from aip.errors import ConfigError
from aip.models.user import build_user_model, is_import_path
from aip.registry import Registry

DETECTORS = Registry("detector")
register_detector = DETECTORS.register
SSD_MIN_SIZE = {"ssd300_vgg16": 268}  # its unpadded conv10_2 / conv11_2 need at least this input


def _torchvision_kwargs(name: str, num_classes: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """No pretrained weights at all, whatever kwargs say (nothing may be downloaded)."""
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise ConfigError(f"model.kwargs.{key}: {name} is built without downloads; load a checkpoint instead")
    return {**kwargs, "weights": None, "weights_backbone": None, "num_classes": num_classes}


def _check_ssd_size(name: str, image_size: int | None) -> None:
    """SSD-style models resize to a fixed square; some need a minimum size (checked before building)."""
    least = SSD_MIN_SIZE.get(name, 32)
    if image_size is not None and image_size < least:
        raise ConfigError(f"model: {name} needs images of at least {least} px, got {image_size}")


def _fixed_size(model: SSD, image_size: int | None) -> SSD:
    """Make an SSD's transform resize every image to image_size x image_size."""
    if image_size is not None:
        model.transform.min_size, model.transform.max_size = (image_size,), image_size
        model.transform.fixed_size = (image_size, image_size)
    return model


def _rcnn_style(builder: Any) -> Any:
    def build(name: str, num_classes: int, image_size: int | None, **kwargs: Any) -> nn.Module:
        if image_size is not None:
            kwargs.setdefault("min_size", image_size)
            kwargs.setdefault("max_size", image_size)
        return builder(**_torchvision_kwargs(name, num_classes, kwargs))

    return build


def _ssd_style(builder: Any) -> Any:
    def build(name: str, num_classes: int, image_size: int | None, **kwargs: Any) -> nn.Module:
        _check_ssd_size(name, image_size)
        return _fixed_size(builder(**_torchvision_kwargs(name, num_classes, kwargs)), image_size)

    return build


register_detector("fasterrcnn_mobilenet_v3_large_320_fpn")(_rcnn_style(detection.fasterrcnn_mobilenet_v3_large_320_fpn))
register_detector("fasterrcnn_resnet50_fpn")(_rcnn_style(detection.fasterrcnn_resnet50_fpn))
register_detector("retinanet_resnet50_fpn")(_rcnn_style(detection.retinanet_resnet50_fpn))
register_detector("ssdlite320_mobilenet_v3_large")(_ssd_style(detection.ssdlite320_mobilenet_v3_large))
register_detector("ssd300_vgg16")(_ssd_style(detection.ssd300_vgg16))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyBackbone(nn.Module):
    """Five stride-2 conv blocks; the last three outputs (strides 8, 16, 32) are the detection features."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(_block(3, width // 2), _block(width // 2, width))
        self.stage1, self.stage2, self.stage3 = _block(width, width), _block(width, width), _block(width, width)
        self.out_channels = [width] * 3

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(f1)
        return OrderedDict([("0", f1), ("1", f2), ("2", self.stage3(f2))])


@register_detector("tiny_ssd")
def tiny_ssd(
    name: str,
    num_classes: int,
    image_size: int | None,
    width: int = 32,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    detections_per_img: int = 200,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> nn.Module:
    """A small SSD (five conv blocks, three feature levels) that trains in seconds on CPU: for tests and demos.
    Its transform normalises with `image_mean` and `image_std` (default 0.5 and 0.25 per channel)."""
    _check_ssd_size(name, image_size)
    size = 64 if image_size is None else image_size
    backbone = TinyBackbone(width)
    anchors = DefaultBoxGenerator([[2], [2], [2]], min_ratio=0.15, max_ratio=0.9)
    head = SSDHead(backbone.out_channels, anchors.num_anchors_per_location(), num_classes)
    return SSD(
        backbone,
        anchors,
        (size, size),
        num_classes,
        image_mean=[0.5] * 3 if image_mean is None else list(image_mean),
        image_std=[0.25] * 3 if image_std is None else list(image_std),
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )


def create_detector(name: str, num_classes: int, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A registered detector by name, or `package.module:callable` (called with num_classes when it takes it)."""
    if num_classes < 2:
        raise ConfigError(f"num_classes: a detector needs the background and at least one class, got {num_classes}")
    if is_import_path(name):
        return build_user_model(name, kwargs, num_classes)
    try:
        return DETECTORS.get(name)(name, num_classes, image_size, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs: {name} does not take them ({' '.join(str(exc).split())})") from None
