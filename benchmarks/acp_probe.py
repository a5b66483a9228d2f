"""Are ACP's searched widths what loses, or its one-shot cut? A look at the published CIFAR ResNet-20 before training.

    python benchmarks/acp_probe.py [--data DIR] [--weights DIR] [--eps 0.1] [--images 200]

ACP's clustering start (DBSCAN on the correlation distance of each group's channel responses to `--images`
training images through the validation transform, the student in train mode, as `mode: acp` does) and the start
scaled under 50% and 30% of the FLOPs (what the swarm's particle 0 becomes), against the widths L1 reaches in one
global prune to the same target. Each student is scored, without any training, after BatchNorm recalibration on
2,000 training images, on every fourth test image (criterion_probe.py's measure): ACP's widths cut by its own
criterion (similarity) and by L1, and L1's own widths.
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
from aip.prune.widths import WidthCost  # noqa: E402
from aip.schema import PruneConfig  # noqa: E402
from aip.search.acp import cluster_channels, scale_to_budget  # noqa: E402
from aip.search.fitness import channel_responses, cut_to_widths  # noqa: E402
from benchmarks.criterion_probe import recalibrated_top1  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path.home() / ".cache" / "aip" / "cifar10"))
    parser.add_argument("--weights", default=str(REPO.parent / "shared" / "weights"))
    parser.add_argument("--eps", type=float, default=0.1, help="acp.eps (its default 0.1)")
    parser.add_argument("--images", type=int, default=200, help="acp.calibration_images (the quality benchmark's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "cifar10_resnet20_eval.yaml", [f"data.root={args.data}"])
    data = build_data(cfg.data)
    view = data.train_eval if data.train_eval is not None else data.train
    test = DataLoader(Subset(data.val, range(0, len(data.val), 4)), batch_size=500)
    calibration = DataLoader(Subset(data.train, range(0, len(data.train), 25)), batch_size=200)
    teacher = create_model("cifar_resnet20", 10, 3, {}, None)
    rename = {".downsample.": ".shortcut."}
    load_into(teacher, load_state_dict_file(Path(args.weights) / "cifar10_resnet20.pth", rename=rename))
    example = data.train[0][0].unsqueeze(0)

    def fresh() -> tuple[torch.nn.Module, ChannelPruner]:
        model = copy.deepcopy(teacher)
        return model, ChannelPruner(model, example, [classifier_of(model)])

    model, pruner = fresh()
    names = list(pruner.widths())
    lower = [pruner.min_width(n) for n in names]
    width_cost = WidthCost(pruner)
    full = width_cost.of(pruner.widths(), "flops")

    def cost(widths: list[int]) -> float:
        return width_cost.of(dict(zip(names, widths, strict=True)), "flops")

    responses = channel_responses(model, pruner.root_modules(), view, args.images, 200, torch.device("cpu"))
    start = [max(lo, cluster_channels(responses[n], args.eps, 5)[0]) for n, lo in zip(names, lower, strict=True)]
    print(f"groups: {', '.join(names)}")
    print(f"clustering start (eps {args.eps}, {args.images} images): {start}, FLOPs {cost(start) / full:.3f}")
    print("\n| target | widths | FLOPs | cut by | top-1 after recalibration |\n|---|---|---|---|---|")
    for target in (0.5, 0.3):
        acp = scale_to_budget([float(w) for w in start], lower, cost, target * full)
        for by in ("similarity", "l1"):
            model, pruner = fresh()
            if by == "similarity":
                held = Subset(view, range(2000, 2400))
                cut_to_widths(pruner, dict(zip(names, acp, strict=True)), PruneConfig(), held, 200, example.device)
            else:
                pruner.prune_to_widths(dict(zip(names, acp, strict=True)), create_importance("l1", PruneConfig()))
            top1 = recalibrated_top1(model, calibration, test)
            print(f"| {target} | ACP start scaled: {acp} | {cost(acp) / full:.3f} | {by} | {top1:.2f} |", flush=True)
        model, pruner = fresh()
        pruner.prune_to(target * full, "flops", create_importance("l1", PruneConfig()))
        widths = [pruner.widths()[n] for n in names]
        top1 = recalibrated_top1(model, calibration, test)
        print(f"| {target} | L1 global: {widths} | {cost(widths) / full:.3f} | l1 | {top1:.2f} |", flush=True)


if __name__ == "__main__":
    main()
