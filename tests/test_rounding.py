"""Hardware-friendly widths (`prune.round_to`): pruned widths stay multiples of N, the targets are still met,
ACP's candidate widths keep to the same grid, and `auto` takes N from the run device's kernels."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from aip.config import SwarmConfig
from aip.models import classifier_of, create_model
from aip.prune.cost import model_cost
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner
from aip.prune.rounding import WidthGrid, blocks, device_round_to
from aip.search.acp import ParticleSwarm, scale_to_budget
from aip.train import main
from tests.conftest import tiny_run


def test_the_grid_keeps_multiples_of_n_within_the_floor_and_the_original() -> None:
    grid = WidthGrid.make(20, 1, 8, 1)  # 20 is no multiple of 8: 16, then 8
    assert grid.below(20) == [16, 8] and grid.below(16) == [8] and grid.below(8) == []
    assert (grid.floor(13), grid.nearest(13), grid.nearest(11.9), grid.nearest(30)) == (8, 16, 8, 20)
    assert blocks(20, 1, grid) == [4, 8]
    assert WidthGrid.make(6, 1, 8, 1).below(6) == []  # narrower than N: stays whole
    assert WidthGrid.make(20, 1, 8, 10).below(20) == [16]  # the floor of 10 channels rounds up to 16
    grouped = WidthGrid.make(32, 4, 6, 1)  # a unit of 4 channels and N = 6: multiples of 12
    assert grouped.below(32) == [24, 12] and blocks(32, 4, grouped) == [2, 3]
    assert WidthGrid.make(32, 4, 1, 5).below(32) == list(range(28, 7, -4))  # no rounding: whole units, >= floor


def _pruned(name: str, round_to: int, ratio: float, **kwargs: float) -> tuple[ChannelPruner, float, float]:
    torch.manual_seed(0)
    model = create_model(name, 10)
    example = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = ChannelPruner(model, example, [classifier_of(model)], round_to=round_to, **kwargs)
    base = pruner.cost("flops")
    pruner.prune_to(ratio * base, "flops", create_importance("l1"))
    return pruner, model_cost(model, example).flops / base, base


@pytest.mark.parametrize(("name", "round_to"), [("cifar_resnet20", 8), ("toy_grouped", 8), ("toy_grouped", 6)])
def test_pruned_widths_are_multiples_of_n_and_the_target_is_met(name: str, round_to: int) -> None:
    pruner, ratio, _ = _pruned(name, round_to, 0.5, max_layer_ratio=0.9)
    assert 0.5 * 0.9 <= ratio <= 0.5
    changed = {n: w for n, w in pruner.widths().items() if w != pruner.original_widths[n]}
    assert changed, "something was pruned"
    for n, w in changed.items():
        step = math.lcm(round_to, pruner.units[n])  # toy_grouped: units of 4 and 8 channels
        assert w % step == 0 and w >= step, (n, w)
    assert name != "toy_grouped" or any(pruner.units[n] > 1 for n in changed)


def test_the_per_layer_cap_rounds_up_to_the_grid() -> None:
    pruner, _, _ = _pruned("cifar_resnet20", 8, 0.6, max_layer_ratio=0.7)  # floor: 16 * 0.3 = 4.8 -> 8
    assert min(pruner.widths().values()) >= 8
    assert pruner.min_width("conv1") == 8 and pruner.grid("layer3.0.conv1").low == 24  # 64 * 0.3 = 19.2 -> 24


def test_prune_below_keeps_the_grid() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10)
    example = torch.randn(1, 3, 32, 32)
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.9, round_to=8)
    base = pruner.cost("flops")
    log = pruner.prune_below(1.0, 0.5 * base, "flops", create_importance("l1"))
    assert log.steps == 1 and log.cost_after < base
    assert all(w % 8 == 0 for w in pruner.widths().values())


def test_acp_candidates_keep_to_the_grid_and_the_budget() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10)
    example = torch.randn(1, 3, 32, 32)
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.9, round_to=8)
    names = list(pruner.widths())
    grids = [pruner.grid(n) for n in names]
    lower, upper = [g.low for g in grids], [g.original for g in grids]
    table = pruner.width_cost()
    budget = 0.5 * table.of(pruner.widths(), "flops")
    seen: list[list[int]] = []

    def cost(w: list[int]) -> float:
        return table.of(dict(zip(names, w, strict=True)), "flops")

    def fitness(w: list[int]) -> float:
        seen.append(w)
        return float(torch.rand(1))

    cfg = SwarmConfig(particles=6, iterations=3, velocity_clip=8.0, init_spread=0.5)
    project = lambda w: scale_to_budget(w, lower, cost, budget, grids)  # noqa: E731
    best = ParticleSwarm(lower, upper, fitness, project, cfg).run(upper)
    assert len(seen) == 24 and all(cost(w) <= budget for w in seen)
    assert all(x % 8 == 0 for w in seen for x in w)
    pruner.prune_to_widths(dict(zip(names, best, strict=True)), create_importance("l1"))
    assert list(pruner.widths().values()) == best


@pytest.mark.parametrize(("capability", "lanes"), [("AVX512", 16), ("AVX2", 8), ("DEFAULT", 1)])
def test_auto_takes_the_channel_block_of_the_cpu_kernels(
    monkeypatch: pytest.MonkeyPatch, capability: str, lanes: int
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    found, source = device_round_to(torch.device("cpu"))
    assert found == lanes and capability in source
    assert device_round_to(torch.device("meta"))[0] == 1  # kernels not known here: any width


def test_a_run_with_round_to_auto_prunes_on_the_device_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**{"prune.round_to": "auto", "prune.finetune_epochs": 0})))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert "prune.round_to auto: 16 (CPU kernels AVX512)" in capsys.readouterr().out
    log = json.loads((tmp_path / "run" / "pruning_log.json").read_text())
    widths = log[-1]["widths"]
    assert all(w % 16 == 0 for w in widths.values()) and log[-1]["ratio_after"] <= 0.6
    assert [e["round_to"] for e in log] == [16, 16]


def test_a_resumed_run_keeps_the_round_to_auto_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job requeued onto a machine with other kernels goes on on the grid it started on (16), not the new one."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**{"prune.round_to": "auto", "prune.finetune_epochs": 0})))
    run = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run)]) == 0
    first = json.loads((run / "pruning_log.json").read_text())
    shutil.rmtree(run / "checkpoints" / "stage-02")
    capsys.readouterr()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # the new node: blocks of 8
    assert main(["--resume", str(run)]) == 0
    assert "prune.round_to auto: 16 (kept from the run's start)" in capsys.readouterr().out
    log = json.loads((run / "pruning_log.json").read_text())
    assert [e["round_to"] for e in log] == [16, 16]
    assert all(w % 16 == 0 for w in log[-1]["widths"].values())
    assert log[-1]["widths"] == first[-1]["widths"]


def test_a_round_to_wider_than_every_group_stops_before_the_teacher_is_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**{"prune.round_to": 100000})))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prune.round_to: 100000 leaves nothing to prune")
    assert "the widest prunable group has 64 channels" in lines[0]
    assert not (tmp_path / "run" / "teacher.pt").exists()
