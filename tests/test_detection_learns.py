"""A small detector trained briefly on the synthetic shapes finds them: mAP@.5 far above the untrained one's."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader

from aip.tasks.detection.datasets import build_detection_data
from aip.tasks.detection.metrics import evaluate_detector
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.transforms import collate

STEPS = 150


def test_tiny_ssd_learns_the_synthetic_shapes() -> None:
    torch.manual_seed(0)
    data = build_detection_data("synthetic", image_size=64, num_classes=3, train_size=512, val_size=64, max_objects=2)
    model = create_detector("tiny_ssd", data.num_classes, 64)
    val = DataLoader(data.val, batch_size=32, collate_fn=collate)
    before = evaluate_detector(model, val, "cpu")
    train = DataLoader(
        data.train, batch_size=16, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=STEPS, pct_start=0.2)

    def batches():
        for epoch in itertools.count():
            data.train.set_epoch(epoch)
            yield from train

    model.train()
    for images, targets in itertools.islice(batches(), STEPS):
        losses = model(images, targets)  # train mode: the detector's own losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
    after = evaluate_detector(model, val, "cpu")
    assert before["map50"] < 5
    assert after["map50"] > 60 and after["map"] > 25
