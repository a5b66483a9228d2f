"""The peer: what people who prune today write. A plain Torch-Pruning script, then fine-tuning with CE or logit KD.

    python benchmarks/peers/torch_pruning_kd.py --weights cifar10_resnet20.pth --data DIR --subset subset.json \
        --target 0.3 --seed 0 --loss kd --out result.json

Written the way Torch-Pruning's README and its benchmarks/main.py do it: `tp.pruner.MetaPruner` with
`tp.importance.GroupMagnitudeImportance(p=1)`, global pruning, the classifier left alone. The pruning ratio is found
by bisection so that `--steps` steps of its linear schedule, taken on the unpruned weights, leave the target share of
the teacher's FLOPs; the steps before the last follow that schedule, and the last is a fresh pruner whose ratio is
bisected again on the trained weights (which rank channels differently), so the network lands at the target, at most
one channel under it. After each step the network trains for `--between` epochs, then `--finetune` epochs more; each
phase has a fresh SGD (momentum 0.9, weight decay 5e-4) and a cosine schedule over its steps. The loss is
cross-entropy (`--loss ce`) or 0.7 CE + 0.3 T^2 KL(student/T || teacher/T) at T=4 (`--loss kd`, Hinton et al.).

Nothing of aip's training, pruning or data code is imported; only the CIFAR ResNet architecture (to hold the
published weights). The training images are the files listed in `--subset` (the quality benchmark writes the same
subset aip trains on); augmentation is aip's: 4-pixel zero-pad, random 32x32 crop, horizontal flip. FLOPs are torch's
own counter (torch.utils.flop_counter) on one 32x32 image, as aip counts them. Top-1 is on the whole test/ tree.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aip.models.cifar_resnet import CifarResNet  # noqa: E402 - the architecture only

DEPTHS = {"resnet20": 20, "resnet56": 56}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # what the published teachers were trained with


def decode(files: list[str]) -> torch.Tensor:
    """Images as one uint8 tensor (N, 3, 32, 32)."""
    to_tensor = v2.PILToTensor()
    return torch.stack([to_tensor(Image.open(f).convert("RGB")) for f in files])


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def flops(model: nn.Module) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    model.train(was_training)
    return int(counter.get_total_flops())


def make_pruner(model: nn.Module, ratio: float, steps: int) -> tp.pruner.MetaPruner:
    return tp.pruner.MetaPruner(
        model,
        torch.zeros(1, 3, 32, 32),
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        global_pruning=True,
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[model.fc],
    )


def bisect_ratio(model: nn.Module, goal: float, steps: int) -> float:
    """The smallest pruning ratio whose `steps` steps, taken on the model's current weights, leave at most `goal`
    FLOPs."""
    lo, hi = 0.0, 0.99
    for _ in range(14):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        pruner = make_pruner(trial, mid, steps)
        for _ in range(steps):
            pruner.step()
        lo, hi = (mid, hi) if flops(trial) > goal else (lo, mid)
    return hi


@torch.no_grad()
def top1(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def train(student, teacher, loader, epochs: int, args) -> None:
    """One phase: a fresh SGD and a cosine schedule over its steps."""
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * len(loader)))
    student.train()
    for _ in range(epochs):
        for x, y in loader:
            out = student(x)
            loss = F.cross_entropy(out, y)
            if args.loss == "kd":
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / args.temperature, dim=1)
                kl = F.kl_div(F.log_softmax(out / args.temperature, dim=1), soft, reduction="batchmean")
                loss = 0.7 * loss + 0.3 * args.temperature**2 * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEPTHS), default="resnet20")
    parser.add_argument("--weights", required=True, help="the published teacher's state dict")
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder tree with train/ and test/")
    parser.add_argument("--subset", required=True, help="JSON list of the training image files, relative to --data")
    parser.add_argument("--target", type=float, required=True, help="share of the teacher's FLOPs to keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=("ce", "kd"), default="kd")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=2, help="iterative pruning steps")
    parser.add_argument("--between", type=int, default=1, help="epochs after each pruning step")
    parser.add_argument("--finetune", type=int, default=2, help="epochs after the last step's")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    teacher = CifarResNet(DEPTHS[args.model])
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    teacher.load_state_dict({k.replace(".downsample.", ".shortcut."): v for k, v in state.items()})
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)

    root = Path(args.data)
    files = json.loads(Path(args.subset).read_text())
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    labels = torch.tensor([classes.index(Path(f).parent.name) for f in files])
    test = datasets.ImageFolder(str(root / "test"))
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    augment = v2.Compose([v2.Pad(4), v2.RandomCrop(32), v2.RandomHorizontalFlip(), *normalise])
    train_set = Images(decode([str(root / f) for f in files]), labels, augment)
    test_set = Images(decode([f for f, _ in test.samples]), torch.tensor(test.targets), v2.Compose(normalise))
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=500)

    base = flops(teacher)
    teacher_top1 = top1(teacher, test_loader)
    ratios = [bisect_ratio(student, args.target * base, args.steps)]
    pruner = make_pruner(student, ratios[0], args.steps)
    stages = []
    for step in range(args.steps):
        if step < args.steps - 1:
            pruner.step()
        else:  # the last step lands on the target from the trained weights
            ratios.append(bisect_ratio(student, args.target * base, 1))
            make_pruner(student, ratios[-1], 1).step()
        train(student, teacher, loader, args.between, args)
        stages.append({"kind": "prune", "flops_ratio": flops(student) / base, "top1": top1(student, test_loader)})
    if args.finetune:
        train(student, teacher, loader, args.finetune, args)
        stages.append({"kind": "finetune", "flops_ratio": flops(student) / base, "top1": top1(student, test_loader)})
    result = {
        "top1": stages[-1]["top1"],
        "flops_ratio": stages[-1]["flops_ratio"],
        "params_ratio": sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters()),
        "pruning_ratios": ratios,
        "teacher_top1": teacher_top1,
        "stages": stages,
        "seconds": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "torch-pruning": importlib.metadata.version("torch-pruning")},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}))


if __name__ == "__main__":
    main()
