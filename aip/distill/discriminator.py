"""The shallow fully-connected discriminator that tells teacher outputs (real) from student outputs (fake)."""

from __future__ import annotations

import torch
from torch import nn


class Discriminator(nn.Module):
    """MLP `in_features -> hidden... -> 1` with LeakyReLU(0.2) between layers; returns one logit per sample, (N,).

    `input="softmax"` turns the network outputs into probabilities first, so D judges the shape of the
    distribution rather than the logits' scale; `"logits"` and `"attention"` (pooled attention maps, see
    `aip.distill.adversarial.pooled_attention`) are taken as they come.
    """

    def __init__(self, in_features: int, hidden: list[int] | None = None, input: str = "logits") -> None:
        super().__init__()
        if input not in ("logits", "softmax", "attention"):
            raise ValueError(f"unknown discriminator input {input!r}; known: logits, softmax, attention")
        self.input = input
        widths = [in_features, *(hidden if hidden is not None else [128, 256, 128])]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(widths[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input == "softmax":
            x = x.softmax(dim=-1)
        return self.net(x).squeeze(-1)
