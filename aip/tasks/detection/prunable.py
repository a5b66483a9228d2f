"""A prunable view of a detector: a plain tensor-in, tensors-out module that Torch-Pruning can trace.

torchvision's detectors take lists of images and run a resizing transform, anchors, box matching and
post-processing, none of which a tracer can follow. The view shares the detector's modules (under the same names,
so a pruning history recorded on the view replays on either) and runs only what carries channels: backbone (and FPN)
features -> the heads' raw per-level outputs. Removing channels through the view removes them from the detector.

- SSD, SSDlite: backbone -> every level's classification and regression convolutions.
- RetinaNet: backbone + FPN -> the shared classification and regression subnets at every level.
- Faster R-CNN: backbone + FPN -> the RPN head at every level, and the box head (fixed boxes pooled from the FPN
  levels, two fully connected layers, the predictor). Mask and keypoint heads are not covered: such models are refused.
- Anything else: the detector's own `prunable_forward(images) -> tuple[Tensor, ...]` and `head_layers()`.

`head_layers` lists the layers whose outputs are per-anchor class scores and box coordinates: their output channels
keep their layout, so they are passed to the pruner as ignored layers (their inputs still shrink).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from aip.errors import ConfigError


def _last_conv(module: nn.Module) -> nn.Module:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else module


def _check_supported(detector: nn.Module) -> None:
    """A one-line ConfigError for detectors the view cannot cover."""
    if isinstance(detector, FasterRCNN):
        if detector.roi_heads.has_mask() or detector.roi_heads.has_keypoint():
            raise ConfigError(
                f"model: {type(detector).__name__} has mask or keypoint heads, which the prunable view does not cover; "
                "prune a Faster R-CNN instead"
            )
        return
    if isinstance(detector, (SSD, RetinaNet)):
        return
    if not (callable(getattr(detector, "prunable_forward", None)) and callable(getattr(detector, "head_layers", None))):
        raise ConfigError(
            f"model: cannot prune a {type(detector).__name__}: give it prunable_forward(images) -> tuple of tensors "
            "(backbone to raw head outputs) and head_layers() -> the layers whose outputs keep their layout"
        )


def head_layers(detector: nn.Module) -> list[nn.Module]:
    """The final layers whose output channels must never be pruned (per-anchor class scores and box coordinates)."""
    _check_supported(detector)
    if isinstance(detector, SSD):
        heads = (detector.head.classification_head, detector.head.regression_head)
        return [_last_conv(m) for head in heads for m in head.module_list]
    if isinstance(detector, RetinaNet):
        return [detector.head.classification_head.cls_logits, detector.head.regression_head.bbox_reg]
    if isinstance(detector, FasterRCNN):
        rpn, predictor = detector.rpn.head, detector.roi_heads.box_predictor
        return [rpn.cls_logits, rpn.bbox_pred, *(m for m in predictor.modules() if isinstance(m, nn.Linear))]
    return list(detector.head_layers())


def fixed_boxes(height: int, width: int, count: int) -> torch.Tensor:
    """`count` boxes (XYXY) spread over the image on a grid, of three sizes, so that every FPN level gets some."""
    side = math.ceil(math.sqrt(count))
    centers = [(i + 0.5) / side for i in range(side)]
    rows = []
    for k in range(count):
        cy, cx = centers[k // side], centers[k % side]
        half = (0.08, 0.2, 0.45)[k % 3]
        rows.append([(cx - half) * width, (cy - half) * height, (cx + half) * width, (cy + half) * height])
    boxes = torch.tensor(rows)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


class PrunableDetector(nn.Module):
    """The channel-carrying part of `detector` as `forward(images (N, 3, H, W)) -> tuple of raw head outputs`.

    `images` are what the detector's own transform produces (normalised, resized, padded): `batch` makes them
    from a list of images. `rois_per_image` sets how many fixed boxes the Faster R-CNN box head sees: its cost
    counts that many times in the FLOPs the pruner targets (the detector itself runs it on ~100-1000 proposals).
    """

    def __init__(self, detector: nn.Module, rois_per_image: int = 16) -> None:
        super().__init__()
        _check_supported(detector)
        self.kind = type(detector).__name__
        self.rois_per_image = rois_per_image
        self._detector = [detector]  # a list keeps it out of this module's children (and its names)
        if isinstance(detector, (SSD, RetinaNet)):
            self.backbone, self.head = detector.backbone, detector.head
        elif isinstance(detector, FasterRCNN):
            self.backbone, self.rpn, self.roi_heads = detector.backbone, detector.rpn, detector.roi_heads
        else:
            for name, child in detector.named_children():
                self.add_module(name, child)

    @property
    def detector(self) -> nn.Module:
        """The detector whose modules this view shares."""
        return self._detector[0]

    @torch.no_grad()
    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """A list of (3, H, W) images in [0, 1] as the detector's transform hands them to its backbone."""
        transform = getattr(self.detector, "transform", None)
        if transform is None:
            return torch.stack(images)
        was_training = transform.training
        transform.eval()
        try:
            return transform(images)[0].tensors
        finally:
            transform.train(was_training)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(images)
        return [features] if isinstance(features, torch.Tensor) else list(features.values())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw head outputs, level by level: deterministic, no anchors, matching or post-processing.

        A batch is required: Torch-Pruning first tries `model(*example)`, which would trace one unbatched image.
        """
        if images.dim() != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(images.shape)}")
        if isinstance(self.detector, SSD):
            cls, reg = self.head.classification_head.module_list, self.head.regression_head.module_list
            feats = self._features(images)
            return tuple(out for f, c, r in zip(feats, cls, reg, strict=True) for out in (c(f), r(f)))
        if isinstance(self.detector, RetinaNet):
            cls, reg = self.head.classification_head, self.head.regression_head
            return tuple(
                out for f in self._features(images) for out in (cls.cls_logits(cls.conv(f)), reg.bbox_reg(reg.conv(f)))
            )
        if isinstance(self.detector, FasterRCNN):
            return self._rcnn(images)
        return tuple(self.detector.prunable_forward(images))

    def _rcnn(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = list(self.backbone(images).values())
        objectness, deltas = self.rpn.head(features)
        boxes = []
        for pooled in self._pool(features[: len(self.roi_heads.box_roi_pool.featmap_names)]):
            boxes.extend(self.roi_heads.box_predictor(self.roi_heads.box_head(pooled)))
        return (*objectness, *deltas, *boxes)

    def _pool(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The box head's input for `rois_per_image` fixed boxes, box k read from level k mod L.

        Cropping by slices and adaptive average pooling stands in for RoIAlign, which is a custom autograd function
        the graph cannot follow; both read each channel on its own, which is all that the channel groups depend on. Each
        box goes through the box head on its own: a concatenation along the batch axis misleads the graph.
        """
        size = self.roi_heads.box_roi_pool.output_size
        out = []
        for k in range(self.rois_per_image):
            f = levels[k % len(levels)]
            h, w = f.shape[-2:]
            x1, y1, x2, y2 = (fixed_boxes(h, w, self.rois_per_image)[k]).tolist()
            ys, xs = slice(int(y1), max(int(y1) + 1, math.ceil(y2))), slice(int(x1), max(int(x1) + 1, math.ceil(x2)))
            out.append(F.adaptive_avg_pool2d(f[:, :, ys, xs], size))
        return out
