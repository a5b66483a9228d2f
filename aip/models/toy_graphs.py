"""Small hand-made graphs with the shapes that break naive channel pruning: a chunked tensor, a concatenation, a
grouped convolution, a depthwise-separable block with squeeze-and-excitation, and GhostNet's concatenation of a layer
with a depthwise copy of it. Registered as models, so configs and the coverage benchmark can name them (`toy_split`,
`toy_concat`, `toy_grouped`, `toy_dw_se`, `toy_ghost`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aip.models.registry import register_model


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class _Classifier(nn.Module):
    """A feature extractor (`features`), global average pooling and a linear classifier (`fc`)."""

    def __init__(self, features: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class SplitBlock(nn.Module):
    """One convolution's output chunked into two halves, each read by its own branch, then concatenated."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = _conv_bn(width, width)
        self.left = _conv_bn(width // 2, width // 2)
        self.right = _conv_bn(width // 2, width // 2, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        return torch.cat([self.left(a), self.right(b)], dim=1)


class ConcatBlock(nn.Module):
    """Two parallel branches (3x3 and 1x1) whose outputs are concatenated and fused by a 1x1 convolution."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.a = _conv_bn(cin, width)
        self.b = _conv_bn(cin, width // 2, k=1)
        self.fuse = _conv_bn(width + width // 2, width, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))


class SqueezeExcite(nn.Module):
    """Channel attention: pooled channels -> reduce -> expand -> sigmoid gate on every channel."""

    def __init__(self, width: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(width, reduced, 1)
        self.expand = nn.Conv2d(reduced, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))


class DepthwiseSEBlock(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, squeeze-and-excitation, 1x1 project, plus the input."""

    def __init__(self, width: int, expand: int = 4) -> None:
        super().__init__()
        hidden = width * expand
        self.expand = _conv_bn(width, hidden, k=1)
        self.depthwise = _conv_bn(hidden, hidden, groups=hidden)
        self.se = SqueezeExcite(hidden, max(4, width // 2))
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class GhostBlock(nn.Module):
    """GhostNet's module: a 1x1 convolution, a depthwise convolution of its output, both concatenated (so channel j
    and channel j + width go together), then a depthwise 3x3 and a 1x1 projection."""

    def __init__(self, cin: int, width: int, cout: int) -> None:
        super().__init__()
        self.primary = _conv_bn(cin, width, k=1)
        self.cheap = _conv_bn(width, width, groups=width)
        self.depthwise = _conv_bn(2 * width, 2 * width, groups=2 * width)
        self.project = _conv_bn(2 * width, cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        return self.project(self.depthwise(torch.cat([primary, self.cheap(primary)], dim=1)))


@register_model("toy_split")
def toy_split(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Stem, two chunk-and-concatenate blocks, classifier."""
    features = nn.Sequential(_conv_bn(in_channels, 16), SplitBlock(16), _conv_bn(16, 32, stride=2), SplitBlock(32))
    return _Classifier(features, 32, num_classes)


@register_model("toy_concat")
def toy_concat(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Stem, two concatenating blocks, classifier."""
    features = nn.Sequential(_conv_bn(in_channels, 16), ConcatBlock(16, 16), ConcatBlock(16, 32))
    return _Classifier(features, 32, num_classes)


@register_model("toy_grouped")
def toy_grouped(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNeXt-like: 1x1 reduce, 3x3 convolution in 4 groups, 1x1 expand, twice."""
    features = nn.Sequential(
        _conv_bn(in_channels, 32),
        _conv_bn(32, 32, k=1),
        _conv_bn(32, 32, groups=4),
        _conv_bn(32, 64, k=1, stride=2),
        _conv_bn(64, 64, groups=8),
        _conv_bn(64, 64, k=1),
    )
    return _Classifier(features, 64, num_classes)


@register_model("toy_dw_se")
def toy_dw_se(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """MobileNet-like: stem, two inverted residual blocks with depthwise convolutions and squeeze-and-excitation."""
    features = nn.Sequential(_conv_bn(in_channels, 16), DepthwiseSEBlock(16), DepthwiseSEBlock(16))
    return _Classifier(features, 16, num_classes)


@register_model("toy_ghost")
def toy_ghost(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """GhostNet-like: stem, two ghost blocks, classifier."""
    features = nn.Sequential(_conv_bn(in_channels, 16), GhostBlock(16, 12, 24), GhostBlock(24, 16, 32))
    return _Classifier(features, 32, num_classes)
