"""An undone removal step puts back the dependency graph's state along with the model's.

Torch-Pruning keeps bookkeeping of its own beside the model: a concatenation's input sizes (`concat_sizes`, edited in
place by a removal) and the node of a bare `nn.Parameter` (replaced by the pruned one). A rollback that restores
only the modules leaves that state describing the removal it undid, so later groups are mapped to the wrong channels
and healthy groups get refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

import aip.prune.pruner as pruner_module
from aip.models import create_model
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner
from aip.prune.safety import Snapshot


def _prune_concat(monkeypatch: pytest.MonkeyPatch, fail_first: bool) -> tuple[ChannelPruner, int]:
    """toy_concat pruned to half its FLOPs by l1; with `fail_first`, the first step's verification fails once."""
    torch.manual_seed(0)
    model = create_model("toy_concat", 10).eval()
    pruner = ChannelPruner(model, torch.randn(1, 3, 32, 32), [model.fc])
    checks = [0]
    real = pruner_module.mismatch

    def mismatch(reference: list[torch.Tensor], found: list[torch.Tensor], rtol: float = 1e-3) -> str | None:
        checks[0] += 1
        if fail_first and checks[0] == 1:
            return "injected failure"
        return real(reference, found, rtol)

    monkeypatch.setattr(pruner_module, "mismatch", mismatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused group warns: none may be
        pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    return pruner, checks[0]


def _concat_sizes(graph: tp.DependencyGraph) -> list[tuple[list[int], list[int]]]:
    ops = [m for m in graph.module2node if isinstance(m, tp.ops._ConcatOp)]
    return sorted((list(op.concat_sizes), list(op.offsets)) for op in ops)


def test_an_undone_step_on_a_concatenation_leaves_the_rest_of_the_run_as_it_would_have_been(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean, clean_checks = _prune_concat(monkeypatch, fail_first=False)
    undone, undone_checks = _prune_concat(monkeypatch, fail_first=True)
    assert undone_checks > clean_checks  # the failure was injected, undone and the groups retried
    assert undone.refused == {}
    assert undone.widths() == clean.widths()
    assert undone.widths() != undone.original_widths
    assert undone.cost("flops") == clean.cost("flops")
    assert _concat_sizes(undone.graph) == _concat_sizes(clean.graph)
    fresh = tp.DependencyGraph().build_dependency(undone.model, example_inputs=undone.example)
    tp.dependency.index_mapping.update_index_mapping(fresh)
    assert _concat_sizes(undone.graph) == _concat_sizes(fresh)  # the bookkeeping matches the model's real widths


def test_restore_puts_back_the_concatenation_sizes_a_removal_edited_in_place() -> None:
    model = create_model("toy_concat", 10).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 16, 16))
    tp.dependency.index_mapping.update_index_mapping(graph)
    before = _concat_sizes(graph)
    snapshot = Snapshot(model, graph)
    branch = model.features[1].b[0]
    graph.get_pruning_group(branch, tp.prune_conv_out_channels, [0, 1, 2]).prune(record_history=False)
    assert _concat_sizes(graph) != before
    snapshot.restore()
    assert _concat_sizes(graph) == before
    assert branch.out_channels == 8 and model.features[1].fuse[0].in_channels == 24
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class Scaled(nn.Module):
    """A convolution scaled per channel by a bare parameter, which Torch-Pruning prunes as a node of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x) * self.scale).mean(dim=(2, 3)))


def test_restore_puts_back_the_node_of_a_pruned_bare_parameter() -> None:
    torch.manual_seed(0)
    model = Scaled().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning's note on unwrapped parameters
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    snapshot = Snapshot(model, graph)
    graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [1, 2]).prune(record_history=False)
    snapshot.restore()
    assert model.scale.shape == (1, 8, 1, 1)
    assert model.scale in graph.module2node and graph.module2node[model.scale].module is model.scale
    graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [1, 2]).prune(record_history=False)
    assert model.scale.shape == (1, 6, 1, 1) and model.b.in_channels == 6
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
