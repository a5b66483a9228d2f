"""Fast intervals: the analytic cost model prices removals exactly, so an interval takes one verified step with no
cost forward, and prunes exactly the channels the FLOP-counter path prunes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from aip.models import classifier_of, create_model
from aip.prune.cost import model_cost
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner
from aip.prune.safety import check_example
from aip.prune.widths import WidthCost


def _pruner(name: str, analytic: bool = True, size: int = 32) -> ChannelPruner:
    torch.manual_seed(0)
    model = create_model(name, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ChannelPruner(model, torch.randn(1, 3, size, size), [classifier_of(model)], analytic=analytic)


@pytest.mark.parametrize("name", ["cifar_resnet8", "toy_grouped", "toy_dw_se"])
def test_the_analytic_path_prunes_exactly_the_channels_of_the_counter_path(name: str) -> None:
    fast, counted = _pruner(name), _pruner(name, analytic=False)
    logs = []
    for pruner in (fast, counted):
        base = pruner.cost("flops")
        logs.append(pruner.prune_to(0.6 * base, "flops", create_importance("l1")))
        logs.append(pruner.prune_to(0.35 * base, "flops", create_importance("l2")))
    assert fast.analytic is True and counted.analytic is False
    assert fast.history() == counted.history()
    assert [log.cost_after for log in logs[:2]] == [log.cost_after for log in logs[2:]]
    assert fast.cost("flops") == model_cost(fast.model, fast.example).flops
    assert all(log.steps == 1 for log in logs[:2])  # priced exactly: one step reaches the target


@pytest.mark.parametrize("name", ["toy_split", "toy_concat", "toy_grouped", "toy_dw_se", "cifar_resnet8_a"])
def test_width_cost_prices_pruned_widths_exactly(name: str) -> None:
    pruner = _pruner(name)
    table = WidthCost(pruner)  # built on the unpruned model, asked about the pruned one
    pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    counted = model_cost(pruner.model, pruner.example)
    assert table.of(pruner.widths(), "flops") == counted.flops
    assert table.of(pruner.widths(), "params") == counted.params


def test_an_interval_runs_two_small_forwards_and_no_cost_forward() -> None:
    pruner = _pruner("cifar_resnet8", size=128)
    pruner.prepare()
    sizes = []
    pruner.model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[-1]))
    log = pruner.prune_to(0.7 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert log.steps == 1 and sizes == [32, 32]  # the reference and the check, on a 32x32 crop
    assert log.cost_after == model_cost(pruner.model, pruner.example).flops <= 0.7 * log.cost_before


class Transposed(nn.Module):
    """A transposed convolution, which the analytic model does not price."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.up(torch.relu(self.a(x))).mean(dim=(2, 3)))


def test_a_model_the_analytic_model_cannot_price_uses_the_counter() -> None:
    torch.manual_seed(0)
    model = Transposed()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    base = pruner.cost("flops")
    assert pruner.analytic is False and base == model_cost(model, example).flops
    log = pruner.prune_to(0.6 * base, "flops", create_importance("l1"))
    assert log.cost_after == model_cost(model, example).flops <= 0.6 * base


class Dense(nn.Module):
    """Per-pixel outputs: a smaller input gives a smaller output, so the check keeps the full example."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_the_check_example_is_cropped_only_where_the_outputs_keep_their_shapes() -> None:
    x = torch.randn(1, 3, 128, 96)
    classifier = create_model("cifar_resnet8", 10).eval()
    assert check_example(classifier, x).shape == (1, 3, 32, 32)
    assert check_example(Dense(), x) is x
    assert check_example(classifier, torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("seed", [1, 3])
def test_two_cuts_land_within_the_slack_under_the_target(seed: int) -> None:
    torch.manual_seed(seed)
    model = create_model("cifar_resnet20", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [classifier_of(model)])
    base = pruner.cost("flops")
    pruner.prune_to(0.5**0.5 * base, "flops", create_importance("l1"))
    pruner.prune_to(0.5 * base, "flops", create_importance("l1"))
    assert 0.499 <= pruner.cost("flops") / base <= 0.5
