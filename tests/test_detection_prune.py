"""Detectors prune through their prunable view: half the FLOPs, head layouts kept, the detector still trains and
detects, and every removal step keeps the view's function (checked independently by replaying the history)."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from torch import nn

from aip.prune.equivalence import replay_deviation
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.prunable import PrunableDetector, head_layers

# SSD300's conv4_3 feeds an L2 normalisation over channels with a learnt per-channel scale: left unpruned.
VGG_L2NORM = {"backbone.features.21"}
# name, image size, groups the pruner must refuse (RetinaNet's and the R-CNN's shared heads run once per level and
# are priced per call)
DETECTORS = [
    ("tiny_ssd", 64, set()),
    ("ssdlite320_mobilenet_v3_large", 96, set()),
    pytest.param("fasterrcnn_mobilenet_v3_large_320_fpn", 64, set(), marks=pytest.mark.slow),
    pytest.param("retinanet_resnet50_fpn", 64, set(), marks=pytest.mark.slow),
    pytest.param("ssd300_vgg16", 268, VGG_L2NORM, marks=pytest.mark.slow),
]


def _batch(size: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    images = [torch.rand(3, size, size, generator=gen) for _ in range(2)]
    boxes = torch.tensor([[4.0, 6.0, size / 2, size / 2 + 6], [size / 3, size / 4, size - 2.0, size - 5.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}, {"boxes": boxes[:1], "labels": torch.tensor([2])}]
    return images, targets


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so a misrouted channel shows in the outputs."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


@pytest.mark.parametrize(("name", "size", "refused"), DETECTORS)
def test_detector_prunes_to_half_the_flops_and_still_trains_and_detects(
    name: str, size: int, refused: set[str]
) -> None:
    start = time.perf_counter()
    detector = create_detector(name, 3, size)
    with torch.no_grad():
        _randomise_norms(detector)
    view = PrunableDetector(detector, rois_per_image=3).eval()
    images, targets = _batch(size)
    example = view.batch(images[:1])
    heads = head_layers(detector)
    head_widths = [m.weight.shape[0] for m in heads]
    names = {m: n for n, m in view.named_modules()}
    original = copy.deepcopy(view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = ChannelPruner(view, example, heads)
        base = pruner.cost("flops")
        pruner.prune_to(0.5 * base, "flops", create_importance("l1"))
    ratio = pruner.cost("flops") / base
    assert 0.45 <= ratio <= 0.5
    assert set(pruner.refused) == refused
    assert [m.weight.shape[0] for m in heads] == head_widths
    assert any(p.shape != q.shape for p, q in zip(view.parameters(), original.parameters(), strict=True))

    _, deviation = replay_deviation(original, pruner.history(), example, [names[m] for m in heads])
    assert deviation < 1e-4

    detector.train()
    losses = detector(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2 and all(d["boxes"].shape[-1] == 4 for d in detections)
    print(f"{name}: {ratio:.3f} of the FLOPs in {time.perf_counter() - start:.1f} s")
