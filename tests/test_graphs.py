"""Pruning is correct on awkward graphs: every removal step keeps the network's function, checked independently.

The independent check (`aip.prune.equivalence`) replays the pruner's history on an untouched copy of the model, step
by step: before each step the channels about to go are masked at the inputs of the layers that read them (forward
pre-hooks, not the pruner's own weight zeroing), and the output with the mask must equal the output after the
channels are removed.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aip.models import classifier_of, create_model
from aip.prune.cost import model_cost
from aip.prune.equivalence import replay_deviation
from aip.prune.groups import coupled_positions
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner, PruningError

TOY = ["toy_split", "toy_concat", "toy_grouped", "toy_dw_se", "toy_ghost", "cifar_resnet8", "cifar_resnet8_a"]


@pytest.mark.parametrize("name", TOY)
def test_toy_graphs_reach_half_the_flops_and_every_step_keeps_the_function(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a misrouted channel shows in the output
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    example = torch.randn(1, 3, 32, 32)
    original = copy.deepcopy(model)
    pruner = ChannelPruner(model, example, [classifier_of(model)])
    base = model_cost(model, example).flops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune_to(0.5 * base, "flops", create_importance("l1"))
    ratio = model_cost(model, example).flops / base
    assert 0.5 * 0.95 <= ratio <= 0.5
    replayed, deviation = replay_deviation(original, pruner.history(), example, ["fc"])
    assert deviation < 1e-4
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(replayed(x), model.eval()(x))


def test_chunked_halves_lose_the_same_number_of_channels() -> None:
    model = create_model("toy_split", 10).eval()
    pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [model.fc])
    pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    for block in (model.features[1], model.features[3]):
        assert block.conv[0].out_channels % 2 == 0
        assert block.left[0].in_channels == block.right[0].in_channels == block.conv[0].out_channels // 2


def test_a_ghost_module_loses_a_channel_and_its_depthwise_copy_together() -> None:
    model = create_model("toy_ghost", 10).eval()
    pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [model.fc])
    pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert pruner.refused == {}
    for block in (model.features[1], model.features[2]):
        width = block.primary[0].out_channels
        assert block.cheap[0].out_channels == width
        assert block.depthwise[0].out_channels == block.project[0].in_channels == 2 * width
    assert model.features[1].primary[0].out_channels < 12 or model.features[2].primary[0].out_channels < 16


class _ProbeGraph:
    """Stands in for Torch-Pruning's graph in `coupled_positions`: removing channel 0 takes `taken` with it."""

    def __init__(self, taken: list[int]) -> None:
        self.taken = taken

    def get_pruning_group(self, root: nn.Module, fn: object, idxs: list[int]) -> list[SimpleNamespace]:
        return [SimpleNamespace(idxs=self.taken)]


def test_coupled_positions_make_a_unit_when_evenly_spaced_and_refuse_otherwise() -> None:
    handler = SimpleNamespace(prune_out_channels=None)
    assert coupled_positions(_ProbeGraph([0]), nn.Identity(), handler, 8) == (1, None)
    assert coupled_positions(_ProbeGraph([0, 4]), nn.Identity(), handler, 8) == (2, None)
    assert coupled_positions(_ProbeGraph([0, 2, 4, 6]), nn.Identity(), handler, 8) == (4, None)
    for taken in ([0, 5], [0, 3, 6]):
        unit, why = coupled_positions(_ProbeGraph(taken), nn.Identity(), handler, 8)
        assert unit == 1 and why is not None and "not evenly spaced" in why


def test_a_group_the_unpruned_model_did_not_have_is_refused_not_guessed() -> None:
    model = create_model("toy_split", 10).eval()
    pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [model.fc])
    names = [g.name for g in pruner._groups()]
    renamed = names[0]
    del pruner.original_widths[renamed]  # as after a removal whose graph couples the channels under a new root
    pruner._enumerated = None
    with pytest.warns(UserWarning, match="regrouped"):
        left = [g.name for g in pruner._groups()]
    assert renamed not in left and set(left) == set(names) - {renamed}
    assert "regrouped" in pruner.refused[renamed]


def test_grouped_convolutions_keep_equal_channel_groups() -> None:
    model = create_model("toy_grouped", 10).eval()
    pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [model.fc])
    pruner.prune_to(0.4 * pruner.cost("flops"), "flops", create_importance("l2"))
    for conv in (model.features[2][0], model.features[4][0]):
        assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
        assert conv.weight.shape[1] == conv.in_channels // conv.groups


def test_zero_padding_shortcut_is_refused_with_its_reason_and_the_rest_prunes() -> None:
    model = create_model("cifar_resnet8_a", 10).eval()
    example = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="channel padding"):
        pruner = ChannelPruner(model, example, [model.fc])
        pruner.prune_to(0.6 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert any("channel padding" in reason for reason in pruner.refused.values())
    assert model.conv1.out_channels == 16  # the padded residual stream keeps its width
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class CustomFunction(torch.autograd.Function):
    """An op the graph cannot see into: reverses the channel order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.flip(1)


class Reversing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(CustomFunction.apply(torch.relu(self.a(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_custom_autograd_function_is_refused_not_guessed() -> None:
    model = Reversing().eval()
    with pytest.warns(UserWarning, match="custom autograd function"):
        pruner = ChannelPruner(model, torch.randn(1, 3, 8, 8), [model.fc])
    assert "a" in pruner.refused
    assert model.a.out_channels == 8


class SlicedWindow(nn.Module):
    """Reads a hard-coded window of a conv's channels: removing a channel before it shifts the window, and the
    classifier no longer fits its input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.a(x)[:, 2:6].mean(dim=(2, 3)))


class CumulativeChannels(nn.Module):
    """A running sum over channels, which the graph takes for an element-wise op: after a removal every shape
    still fits, but the later channels' values change."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.cumsum(torch.relu(self.a(x)), dim=1)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("make", "reason"), [(CumulativeChannels, "computes something else"), (SlicedWindow, "broke the forward")]
)
def test_a_step_that_changes_the_function_is_rolled_back_and_the_group_left(make: type, reason: str) -> None:
    model = make().eval()
    example = torch.randn(1, 3, 8, 8)
    weight = model.a.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = ChannelPruner(model, example, [model.fc])
        try:
            pruner.prune_to(0.3 * pruner.cost("flops"), "flops", create_importance("l1"))
        except PruningError as exc:
            assert "cannot reach the target" in str(exc)
    assert reason in pruner.refused["a"]
    assert any("leaving group a unpruned" in str(w.message) for w in caught)
    assert [entry for entry in pruner.history() if entry[0] == "a"] == []
    torch.testing.assert_close(model.a.weight, weight, rtol=0, atol=0)  # rolled back exactly, silenced weights too
    if not pruner.history():
        assert model(example).shape == (1, 3)


def test_a_group_the_graph_cannot_map_is_refused_and_the_others_still_prune(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_pruning as tp

    model = create_model("toy_concat", 10).eval()
    broken = model.features[1].b[0]
    original = tp.DependencyGraph.get_pruning_group

    def get_pruning_group(self, module, fn, idxs):  # noqa: ANN001, ANN202
        if module is broken:
            raise IndexError("list index out of range")
        return original(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", get_pruning_group)
    with pytest.warns(UserWarning, match="cannot map its channels"):
        pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [model.fc])
    assert "features.1.b.0" in pruner.refused
    pruner.prune_to(0.6 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert broken.out_channels == 8 and model.features[1].a[0].out_channels < 16


class ChannelsLast(nn.Module):
    """A ConvNeXt-like block: a convolution, then linear layers applied at every position of an (N, H, W, C) map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.down(torch.relu(self.up(x)))
        return self.fc(x.mean(dim=(1, 2)))


def test_linear_layers_on_channels_last_maps_are_priced_per_position() -> None:
    from aip.prune.widths import WidthCost

    model = ChannelsLast().eval()
    example = torch.randn(1, 3, 16, 16)
    pruner = ChannelPruner(model, example, [model.fc])
    log = pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert log.steps <= 3  # priced per position, one step nearly fills the gap (per-row pricing took dozens)
    assert 0.5 * 0.95 <= log.cost_after / log.cost_before <= 0.5
    assert WidthCost(pruner).of(pruner.widths(), "flops") == pytest.approx(pruner.cost("flops"))
