"""The interval pruner: targets met, caps held, coupling respected, history replays, criteria registered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aip.prune.cost import model_cost
from aip.prune.importance import IMPORTANCES, create_importance, needs_gradients
from aip.prune.pruner import ChannelPruner, PruningError
from aip.prune.schedule import interval_targets


class Residual(nn.Module):
    """Two convs whose outputs are summed: their output channels are coupled and must be pruned together."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor"])
def test_prune_to_meets_target_within_5_percent_and_model_still_trains(criterion: str) -> None:
    model = Residual()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc], max_layer_ratio=0.9)
    base = model_cost(model, example).flops

    def calibrate(m: nn.Module) -> None:
        m(torch.randn(8, 3, 16, 16)).sum().backward()

    imp = create_importance(criterion)
    log = pruner.prune_to(0.5 * base, "flops", imp, calibrate if needs_gradients(imp) else None)
    ratio = model_cost(model, example).flops / base
    assert 0.5 * 0.95 <= ratio <= 0.5
    assert log.cost_after == pytest.approx(ratio * base)
    out = model(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 5)  # the classifier keeps its outputs
    out.sum().backward()
    assert model.stem.weight.grad is not None
    assert model.stem.out_channels == model.a.out_channels  # coupled by the residual sum


def test_caps_hold_and_impossible_target_is_reported() -> None:
    model = Residual()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc], max_layer_ratio=0.5)
    base = model_cost(model, example).flops
    with pytest.raises(PruningError, match="max_layer_ratio=0.5"):
        pruner.prune_to(0.05 * base, "flops", create_importance("l1"))
    for name, width in pruner.widths().items():
        assert width >= pruner.original_widths[name] * 0.5


def test_history_replays_onto_a_fresh_model() -> None:
    torch.manual_seed(1)
    model = Residual()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    pruner.prune_to(0.7 * model_cost(model, example).flops, "flops", create_importance("l1"))
    pruner.prune_to(0.4 * model_cost(model, example).flops, "flops", create_importance("l2"))
    fresh = Residual()
    replayed = ChannelPruner(fresh, example, [fresh.fc])
    replayed.replay(pruner.history())
    assert {n: p.shape for n, p in fresh.state_dict().items()} == {n: p.shape for n, p in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_l1_removes_the_weakest_filters_first() -> None:
    model = Residual()
    with torch.no_grad():
        model.b.weight[[3, 7]] *= 1e-3  # two nearly dead filters of an uncoupled layer
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    before = model.b.weight.detach().clone()
    pruner.prune_to(0.9 * model_cost(model, example).flops, "flops", create_importance("l1"))
    kept = model.b.weight.detach()
    assert 0 < len(kept) < 32
    survivors = {i for i in range(32) if any(torch.equal(before[i], k) for k in kept)}
    assert len(survivors) == len(kept)
    assert 3 not in survivors and 7 not in survivors


def test_a_frozen_model_is_traced_and_stays_frozen() -> None:
    model = Residual().requires_grad_(False)
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    assert set(pruner.widths()) == {"a", "b"}
    pruner.prune_to(0.6 * model_cost(model, example).flops, "flops", create_importance("l1"))
    assert not any(p.requires_grad for p in model.parameters())


def test_registry_lists_the_required_criteria() -> None:
    assert {"l1", "l2", "bn_scale", "taylor"} <= set(IMPORTANCES.names())


def test_schedules_end_at_the_target() -> None:
    geo = interval_targets(0.5, 3, "geometric")
    lin = interval_targets(0.5, 4, "linear")
    assert geo[-1] == pytest.approx(0.5) and lin[-1] == pytest.approx(0.5)
    assert geo == sorted(geo, reverse=True) and lin == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert geo[0] == pytest.approx(0.5 ** (1 / 3))
    with pytest.raises(ValueError):
        interval_targets(1.2, 3)
