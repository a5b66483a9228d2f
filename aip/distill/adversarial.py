"""The discriminator's side of the adversarial game: its update, and the width-independent attention input that
lets it judge what a pruned network computes inside (detectors always; classifiers with `disc.input: attention`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from aip.accel import step_before_update
from aip.distill.losses import discriminator_loss

GRID = 4  # each tap's attention map is pooled to GRID x GRID for the discriminator


def pooled_attention(features: list[torch.Tensor], grid: int = GRID) -> torch.Tensor:
    """(N, taps * grid * grid): each tap's attention map pooled to grid x grid, L2-normalised per tap."""
    maps = []
    for f in features:
        amap = F.adaptive_avg_pool2d(f.float().pow(2).mean(1, keepdim=True), grid)
        maps.append(F.normalize(amap.flatten(1), dim=1))
    return torch.cat(maps, dim=1)


def update_discriminator(
    acc: Accelerator, disc: nn.Module, opt_d: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor, steps: int
) -> torch.Tensor:
    """`steps` Adam updates of the discriminator on one batch, teacher `real` against detached student `fake`
    (the update ratio: discriminator steps per student step); returns the last update's loss."""
    batch = torch.cat([real.detach(), fake.detach()])
    for _ in range(steps):
        d_out = disc(batch)
        loss = discriminator_loss(d_out[: len(real)], d_out[len(real) :])
        acc.backward(loss)
        step_before_update(opt_d)  # the student's step updates the shared fp16 scale, once
        opt_d.zero_grad(set_to_none=True)
    return loss
