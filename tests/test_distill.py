"""Distillation pieces against hand computations: KD, attention transfer, adversarial losses, taps, discriminator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aip.distill.attention import attention_loss, attention_map
from aip.distill.discriminator import Discriminator
from aip.distill.features import FeatureTaps
from aip.distill.losses import adversarial_loss, discriminator_loss, kd_loss


def test_kd_kl_matches_the_written_out_sum() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temp = 2.0
    p_t = torch.softmax(t / temp, dim=1)
    p_s = torch.softmax(s / temp, dim=1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() / 2 * temp**2
    torch.testing.assert_close(kd_loss(s, t, temp, "kl"), expected)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(kd_loss(s, t, temp, "mse"), ((s - t) ** 2).mean())


def test_adversarial_losses_match_log_sigmoid() -> None:
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = -(sig(real).log().mean()) - ((1 - sig(fake)).log().mean())
    torch.testing.assert_close(discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(adversarial_loss(fake), -(sig(fake).log().mean()))


def test_attention_map_shape_and_unit_norm() -> None:
    x = torch.randn(3, 8, 5, 4)
    a = attention_map(x)
    assert a.shape == (3, 20)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    manual = x.pow(2).mean(dim=1).flatten(1)
    torch.testing.assert_close(a, manual / manual.norm(dim=1, keepdim=True))


def test_attention_loss_hand_computed_and_robust_to_widths_and_sizes() -> None:
    s = torch.randn(2, 4, 3, 3)
    t = torch.randn(2, 6, 3, 3)  # the teacher is wider than the pruned student
    expected = (attention_map(s) - attention_map(t)).pow(2).mean()
    torch.testing.assert_close(attention_loss([s], [t]), expected)
    torch.testing.assert_close(attention_loss([s, s], [t, t]), 2 * expected)
    assert attention_loss([t], [t]).item() == pytest.approx(0.0, abs=1e-8)
    small = attention_loss([torch.randn(2, 4, 4, 4)], [torch.randn(2, 8, 8, 8)])
    assert small.dim() == 0 and math.isfinite(small.item())
    half = attention_loss([s.bfloat16()], [t.bfloat16()])
    assert half.dtype == torch.float32


def test_feature_taps_keep_only_the_latest_forward() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1))
    with FeatureTaps(model, ["0", "2"]) as taps:
        model(torch.randn(5, 3, 8, 8))
        model(torch.randn(2, 3, 8, 8))
        shapes = [tuple(o.shape) for o in taps.outputs]
        assert shapes == [(2, 4, 8, 8), (2, 2, 4, 4)]
    assert taps.outputs == []
    model(torch.randn(1, 3, 8, 8))
    assert taps.outputs == []  # hooks removed
    with pytest.raises(ValueError, match="no module named \\['5'\\]"):
        FeatureTaps(model, ["5"])


def test_discriminator_learns_to_separate_a_shift() -> None:
    torch.manual_seed(0)
    disc = Discriminator(10, [32, 32])
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    for _ in range(200):
        real, fake = torch.randn(64, 10) + 1.0, torch.randn(64, 10) - 1.0
        loss = discriminator_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = torch.randn(500, 10) + 1.0, torch.randn(500, 10) - 1.0
    assert disc(real).shape == (500,)
    accuracy = ((disc(real) > 0).float().mean() + (disc(fake) < 0).float().mean()) / 2
    assert accuracy > 0.9
    assert Discriminator(10, input="softmax")(torch.randn(3, 10)).shape == (3,)
