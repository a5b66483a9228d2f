"""How large is attention transfer's gradient against CE + KD's, as a student is pruned harder?

    python benchmarks/at_gradient_probe.py [--weights DIR] [--data DIR] [--ratios 0.7 0.55 0.5 0.3] [--batches 4]

The published CIFAR ResNet-20 is pruned in one Torch-Pruning step (GroupMagnitudeImportance p=1, global, the ratio
bisected to each FLOPs target, as the peer script does) and, right after the cut, on `--batches` batches of 128
training images (validation transform, a fixed random draw), the gradient norms over the student's parameters of
0.7 CE + 0.3 T^2 KL (T=4) and of attention transfer at weight 1 (aip's loss, taps layer1-3) are measured separately.
The last column is AT's gradient norm at weight 1000 over the task's: what an AT weight "set so its gradient is a
fixed fraction of CE+KD's" would scale by.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets
from torchvision.transforms import v2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
from torch_pruning_kd import MEAN, STD, bisect_ratio, flops, make_pruner  # noqa: E402

from aip.distill.attention import attention_loss  # noqa: E402
from aip.models.cifar_resnet import CifarResNet  # noqa: E402

TAPS = ("layer1", "layer2", "layer3")


def with_taps(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    feats: list[torch.Tensor] = []
    hooks = [getattr(model, n).register_forward_hook(lambda _m, _i, o: feats.append(o)) for n in TAPS]
    out = model(x)
    for h in hooks:
        h.remove()
    return out, feats


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(REPO.parent / "shared" / "weights"))
    parser.add_argument("--data", default=str(Path.home() / ".cache" / "aip" / "cifar10"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.55, 0.5, 0.3])
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = CifarResNet(20)
    state = torch.load(Path(args.weights) / "cifar10_resnet20.pth", map_location="cpu", weights_only=True)
    teacher.load_state_dict({k.replace(".downsample.", ".shortcut."): v for k, v in state.items()})
    teacher.eval().requires_grad_(False)
    view = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    train = datasets.ImageFolder(str(Path(args.data) / "train"), transform=view)
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: 128 * args.batches].tolist()
    xs = torch.stack([train[i][0] for i in picked])
    ys = torch.tensor([train[i][1] for i in picked])
    print("| FLOPs kept | task loss | AT loss (w=1) | grad task | grad AT (w=1) | grad AT (w=1000) / grad task |")
    print("|---|---|---|---|---|---|")
    for target in args.ratios:
        student = copy.deepcopy(teacher).requires_grad_(True)
        make_pruner(student, bisect_ratio(student, target, 1), 1).step()
        student.train()
        params = list(student.parameters())
        sums = torch.zeros(4)
        for b in range(args.batches):
            x, y = xs[b * 128 : (b + 1) * 128], ys[b * 128 : (b + 1) * 128]
            with torch.no_grad():
                t_out, t_feats = with_taps(teacher, x)
            s_out, s_feats = with_taps(student, x)
            kl = F.kl_div(F.log_softmax(s_out / 4, 1), F.softmax(t_out / 4, 1), reduction="batchmean")
            task = 0.7 * F.cross_entropy(s_out, y) + 0.3 * 16 * kl
            at = attention_loss(s_feats, t_feats)
            sums += torch.tensor([task.item(), at.item(), grad_norm(task, params), grad_norm(at, params)])
        task_l, at_l, g_task, g_at = (sums / args.batches).tolist()
        kept = flops(student) / flops(teacher)
        print(f"| {kept:.3f} | {task_l:.3f} | {at_l:.5f} | {g_task:.2f} | {g_at:.4f} | {1000 * g_at / g_task:.2f} |")


if __name__ == "__main__":
    main()
