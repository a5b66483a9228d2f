"""ResNets for 32x32 inputs (He et al. 2016): three stages of 16/32/64 channels, 6n+2 layers.

Shortcuts that change shape are 1x1 convolution + BN (option B), which Torch-Pruning couples with the block output;
`cifar_resnet*_a` use the paper's option A instead: the input subsampled and zero-padded with channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aip.models.registry import register_model


class PadShortcut(nn.Module):
    """Option A: subsample by `stride` and zero-pad the channels on both sides up to `planes` (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (identity, or when the shape changes 1x1 conv + BN, or option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.out_relu = nn.ReLU()  # not in place: a feature tap may hold the block output
        self.shortcut: nn.Module = nn.Sequential()
        if (stride != 1 or in_planes != planes) and shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        elif stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, three stages (layer1..layer3) of n BasicBlocks at 16/32/64 channels, global pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "B") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, 1, shortcut)
        self.layer2 = self._stage(16, 32, n, 2, shortcut)
        self.layer3 = self._stage(32, 64, n, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, shortcut)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _factory(depth: int, shortcut: str = "B") -> Callable[..., CifarResNet]:
    """A registry factory for one depth, with the (num_classes, in_channels) signature of all registered models."""

    def create(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, shortcut)

    create.__doc__ = f"CIFAR ResNet-{depth}" + (" with zero-padding shortcuts (option A)." if shortcut == "A" else ".")
    return create


for _depth in (8, 20, 32, 56, 110):
    register_model(f"cifar_resnet{_depth}")(_factory(_depth))
    register_model(f"cifar_resnet{_depth}_a")(_factory(_depth, "A"))
