"""mAP against hand-computed values: one image, known IoUs and scores, COCO's 101-point interpolation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aip.tasks.detection.metrics import evaluate_detector, mean_average_precision

GT = torch.tensor([[50.0, 50.0, 80.0, 90.0], [10.0, 10.0, 30.0, 30.0]])
CROWD = torch.tensor([[60.0, 0.0, 90.0, 30.0]])
# p1 = the first box exactly (IoU 1); p2 overlaps nothing; p3 covers 72% of the second box (IoU 0.72); p4 on the crowd.
PRED_BOXES = torch.tensor(
    [[50.0, 50.0, 80.0, 90.0], [0.0, 60.0, 20.0, 80.0], [10.0, 10.0, 30.0, 24.4], [60.0, 0.0, 90.0, 30.0]]
)
PRED_SCORES = torch.tensor([0.9, 0.8, 0.7, 0.85])

# IoU thresholds .50-.70 (5 of 10): ranks TP, FP, TP -> precision 1 up to recall .5, then 2/3 up to recall 1.
AP_LOW = (51 * 1.0 + 50 * 2 / 3) / 101
# IoU thresholds .75-.95: only p1 matches -> precision 1 up to recall .5, nothing beyond.
AP_HIGH = 51 / 101


def _records(crowd_flag: int) -> list[tuple[dict, dict]]:
    pred = {"boxes": PRED_BOXES, "scores": PRED_SCORES, "labels": torch.ones(4, dtype=torch.long)}
    target = {
        "boxes": torch.cat([GT, CROWD]),
        "labels": torch.ones(3, dtype=torch.long),
        "iscrowd": torch.tensor([0, 0, crowd_flag]),
    }
    return [(pred, target)]


def test_map_matches_the_hand_computed_values_and_ignores_detections_on_crowds() -> None:
    result = mean_average_precision(_records(crowd_flag=1))
    assert result["map50"] == pytest.approx(100 * AP_LOW, abs=1e-3)
    assert result["map"] == pytest.approx(100 * (AP_LOW + AP_HIGH) / 2, abs=1e-3)
    # Counted as an object instead, the crowd box is matched by p4 and changes the ranking: a different value.
    assert mean_average_precision(_records(crowd_flag=0))["map50"] != pytest.approx(100 * AP_LOW, abs=1e-1)


class FixedDetector(nn.Module):
    """Returns the same detections for every image; remembers its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.modes.append(self.training)
        pred = _records(1)[0][0]
        return [dict(pred) for _ in images]


def test_evaluator_runs_in_eval_mode_gathers_per_batch_and_restores_the_mode() -> None:
    target = _records(1)[0][1]
    loader = [([torch.rand(3, 100, 100)] * 2, [target, target]), ([torch.rand(3, 100, 100)], [target])]
    calls: list[int] = []

    def gather(records: list) -> list:  # two processes that saw the same images
        calls.append(len(records))
        return records + records

    model = FixedDetector().train()
    result = evaluate_detector(model, loader, "cpu", gather=gather)
    assert calls == [2, 1] and model.modes == [False, False] and model.training
    assert result["map50"] == pytest.approx(100 * AP_LOW, abs=1e-3)
    assert result["map"] == pytest.approx(100 * (AP_LOW + AP_HIGH) / 2, abs=1e-3)
