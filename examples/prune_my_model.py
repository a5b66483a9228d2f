"""Prune a model of your own with the Python API: your nn.Module class, your data sets, one call.

    python examples/prune_my_model.py [--out runs/mine]     # about 20 s on 2 CPU cores
    accelerate launch examples/prune_my_model.py             # the same call on several processes or GPUs

A small CNN is trained here by hand for a few epochs (stand-in for your trained model) on random images whose class
is a per-class brightness pattern, then `aip.run` prunes a copy of it to 40% of its FLOPs with adversarial
distillation and prints the stage table. Your model is never modified.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import aip  # noqa: E402

CLASSES, SIZE = 4, 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SmallNet(nn.Module):
    """Three conv-BN-ReLU stages and a linear head: the kind of network a user brings."""

    def __init__(self, classes: int = CLASSES, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1 = block(3, width, 1)
        self.stage2 = block(width, 2 * width, 2)
        self.stage3 = block(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(x.mean(dim=(2, 3)))


class PatternImages(Dataset):
    """(image, label) pairs: noise plus a fixed random pattern of the label's class, so the classes can be told."""

    def __init__(self, count: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        patterns = torch.randn(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        self.labels = torch.randint(0, CLASSES, (count,), generator=gen)
        self.images = patterns[self.labels] + 2.5 * torch.randn(count, 3, SIZE, SIZE, generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def train_by_hand(model: nn.Module, data: Dataset, epochs: int = 3) -> nn.Module:
    """Your own training loop: plain SGD on cross-entropy."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for x, y in torch.utils.data.DataLoader(data, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mine", help="run directory (must not hold another run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set, val_set = PatternImages(512, seed=1), PatternImages(256, seed=2)
    my_trained_model = train_by_hand(SmallNet(), train_set)

    cfg = aip.load_config(
        os.path.join(REPO, "configs", "debug.yaml"),
        overrides=[
            "prune.target_flops_ratio=0.4",
            "prune.intervals=2",
            "data.batch_size=32",
            "data.eval_batch_size=128",
            "export.formats=[pt2]",
            "logging.report_to=[]",
        ],
    )
    result = aip.run(cfg, teacher=my_trained_model, train_data=train_set, val_data=val_set, out=args.out)

    pruned = result.student  # the pruned nn.Module, recovered
    assert isinstance(pruned, SmallNet) and pruned(val_set[0][0][None]).shape == (1, CLASSES)
    if PartialState().is_main_process:  # under `accelerate launch` every process gets the result; one prints it
        print(json.dumps(result.report))  # the stage table, the same dict as report.json


if __name__ == "__main__":
    main()
