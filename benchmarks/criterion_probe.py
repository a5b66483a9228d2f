"""How much each criterion's second interval damages the published CIFAR ResNet-20, before any training.

    python benchmarks/criterion_probe.py [--data DIR] [--weights DIR] [--criteria l1 similarity fpgm ...]

Interval 1 prunes to 0.707 of the teacher's FLOPs with L1; interval 2 goes on to 0.5 with each criterion (the
hybrid criterion's switch). Each student is scored after BatchNorm recalibration (running statistics recomputed on
2,000 training images, no weight update) on every fourth test image (2,500): a cheap view of what the criterion
kept, and of the widths it left in the first stage, without the noise of a recovery run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aip.config import load_config  # noqa: E402
from aip.data import build_data  # noqa: E402
from aip.models import classifier_of, create_model  # noqa: E402
from aip.models.weights import load_into, load_state_dict_file  # noqa: E402
from aip.prune.importance import create_importance  # noqa: E402
from aip.prune.pruner import ChannelPruner  # noqa: E402
from aip.schema import PruneConfig  # noqa: E402

FIRST_STAGE = ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]


@torch.no_grad()
def recalibrated_top1(model: torch.nn.Module, calibration: DataLoader, test: DataLoader) -> float:
    """Top-1 (%) after recomputing every BatchNorm's running statistics on `calibration`."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    for x, _ in calibration:
        model(x)
    model.eval()
    correct = total = 0
    for x, y in test:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path.home() / ".cache" / "aip" / "cifar10"))
    parser.add_argument("--weights", default=str(REPO.parent / "shared" / "weights"))
    parser.add_argument("--criteria", nargs="+", default=["l1", "l2", "similarity", "fpgm"])
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "cifar10_resnet20_eval.yaml", [f"data.root={args.data}"])
    data = build_data(cfg.data)
    test = DataLoader(Subset(data.val, range(0, len(data.val), 4)), batch_size=500)
    calibration = DataLoader(Subset(data.train, range(0, len(data.train), 25)), batch_size=200)
    teacher = create_model("cifar_resnet20", 10, 3, {}, None)
    state = load_state_dict_file(Path(args.weights) / "cifar10_resnet20.pth", rename={".downsample.": ".shortcut."})
    load_into(teacher, state)
    example = data.train[0][0].unsqueeze(0)
    print(f"teacher: {recalibrated_top1(teacher, calibration, test):.2f}", flush=True)
    first = copy.deepcopy(teacher)
    pruner = ChannelPruner(first, example, [classifier_of(first)], 0.9)
    base = pruner.cost("flops")
    pruner.prune_to(0.707 * base, "flops", create_importance("l1", PruneConfig()))
    print(f"interval 1 (l1 to 0.707): {recalibrated_top1(first, calibration, test):.2f}", flush=True)
    print("| interval 2 criterion | top-1 after recalibration | first-stage widths (of 16) |\n|---|---|---|")
    for name in args.criteria:
        student = copy.deepcopy(teacher)
        second = ChannelPruner(student, example, [classifier_of(student)], 0.9)
        second.replay(pruner.history())
        second.prune_to(0.5 * base, "flops", create_importance(name, PruneConfig()))
        widths = second.widths()
        top1 = recalibrated_top1(student, calibration, test)
        print(f"| {name} | {top1:.2f} | {', '.join(str(widths[k]) for k in FIRST_STAGE)} |", flush=True)


if __name__ == "__main__":
    main()
