"""Latency targets: the pruner prunes until the measured latency meets the target, pricing channels from layer
times moved along each layer's curve (timed alone at a few widths) and ranking them by score per millisecond; a run
with prune.target_latency_ratio reports the latency of each stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from torch import nn

from aip.models import classifier_of, create_model
from aip.prune.importance import create_importance
from aip.prune.latency import LatencyTable, LayerCurve, layer_curves, layer_times, measure_latency, relative_latency
from aip.prune.pruner import ChannelPruner
from aip.prune.selection import Candidate, per_price
from aip.train import main
from tests.conftest import tiny_run


def _pruner() -> ChannelPruner:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10)
    return ChannelPruner(model, torch.randn(1, 3, 32, 32), [classifier_of(model)], max_layer_ratio=0.9)


def test_a_latency_target_of_half_is_met_within_5_percent() -> None:
    pruner = _pruner()
    table = pruner.width_cost()
    slow = {i: 3.0 if i % 3 == 0 else 1.0 for i in range(len(table.layers))}  # some layers slow per FLOP

    def times() -> list[float]:  # a deterministic stand-in for measured layer times (ms)
        return [
            slow[i] * 1e-6 * 2 * layer.macs(*layer.live())[0] * layer.positions + 0.05
            for i, layer in enumerate(table.layers)
        ]

    def measure() -> float:
        return sum(times()) + 0.3  # plus what no layer group carries

    base = measure()
    log = pruner.prune_to(
        0.5 * base,
        "latency",
        create_importance("l1"),
        measure=measure,
        pricer=lambda _: LatencyTable(table, times(), measure()),
    )
    assert 0.5 * 0.95 * base <= measure() <= 0.5 * base
    assert log.cost_after == measure() and log.steps >= 1


def test_layer_times_and_the_table_come_from_real_measurements() -> None:
    pruner = _pruner()
    x = torch.randn(8, 3, 32, 32)
    layers = [layer.module for layer in pruner.width_cost().layers]
    times = layer_times(pruner.model, layers, x, repeats=3)
    total = measure_latency(pruner.model, x, warmup=1, repeats=3)
    assert len(times) == len(layers) and all(t > 0 for t in times) and sum(times) < 2 * total
    curves = layer_curves(pruner.model, layers, x)
    table = LatencyTable(pruner.width_cost(), times, total, curves)
    assert all(table.peek(name, 1) >= 0 for name in pruner.widths())
    assert sum(table.peek(name, 4) for name in pruner.widths()) > 0
    assert pruner.model.training  # the mode is restored
    twin = copy.deepcopy(pruner.model).train()
    assert 0.5 < relative_latency(pruner.model, twin, x, warmup=1, repeats=5) < 2.0
    assert pruner.model.training and twin.training


def test_a_run_with_a_latency_target_reports_the_latency_of_each_stage(tmp_path: Path) -> None:
    overrides = {"prune.target_flops_ratio": None, "prune.target_latency_ratio": 0.6, "prune.finetune_epochs": 0}
    overrides["data.batch_size"] = 128  # latency measured on 128 images: milliseconds of arithmetic, not of noise
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**overrides)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: its timings do not wait on a second core another process holds
    try:
        assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"]["latency_ms"] > 0 and "latency" not in report["teacher"]
    assert all(s["latency_ms"] > 0 for s in report["stages"])
    log = json.loads((tmp_path / "run" / "pruning_log.json").read_text())
    assert [e["metric"] for e in log] == ["latency", "latency"]
    assert log[-1]["ratio_after"] <= 0.6 and report["stages"][-1]["flops"] < report["teacher"]["flops"]


def test_a_curve_interpolates_between_its_widths_and_extends_past_them() -> None:
    curve = LayerCurve(outs=[4.0, 8.0], ins=[2.0, 4.0], ms=[[1.0, 2.0], [3.0, 6.0]])
    assert curve.at(8, 4) == 6.0 and curve.at(4, 2) == 1.0
    assert curve.at(6, 3) == 3.0  # bilinear: rows at in=3 are 1.5 and 4.5
    assert curve.at(2, 4) == 0.0  # extended linearly below the grid (2 - 4 = -2, floored at 0)
    assert curve.at(12, 4) == 10.0  # and above it


def test_layer_curves_time_each_kind_of_layer_once_on_a_monotone_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),  # the same as the one before: measured once
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: its input follows its output
        nn.Conv2d(16, 32, 3, padding=1, groups=16),  # a channel multiplier: not rebuilt, priced by FLOPs
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    curves = layer_curves(model, layers, torch.randn(2, 3, 8, 8), repeats=1)
    assert curves[1] is curves[2] and curves[0] is not curves[1] and curves[4] is None
    assert curves[1].outs == [4.0, 8.0, 12.0, 16.0] and curves[1].ins == [4.0, 8.0, 12.0, 16.0]
    assert curves[3].ins == [16.0] and curves[3].outs == [4.0, 8.0, 12.0, 16.0]
    assert curves[5].outs == [2.0, 5.0, 8.0, 10.0] and curves[5].ins[-1] == 32 * 8 * 8
    for curve in (curves[0], curves[1], curves[3], curves[5]):
        for r, row in enumerate(curve.ms):
            assert all(t > 0 for t in row) and row == sorted(row)
            assert r == 0 or all(a >= b for a, b in zip(row, curve.ms[r - 1], strict=True))


def test_the_table_moves_each_layer_along_its_curve() -> None:
    pruner = _pruner()
    table = pruner.width_cost()
    times = [1.0] * len(table.layers)
    # layer i is timed at its widths now; a curve that doubles from half the width (out) makes a removal's price
    curves = []
    for layer in table.layers:
        out, inp = layer.live()
        curves.append(LayerCurve([out / 2, out], [float(inp)], [[0.5], [1.0]]))
    latency = LatencyTable(table, times, total=2.0 * len(times), curves=curves)  # the rest doubles every layer
    name = next(iter(pruner.widths()))
    pricer = table.pricer("flops")
    removed_out = [i for i in pricer.touches[name] if table.layers[i].out_terms.get(name)]
    expected = sum(2.0 * (1.0 / table.layers[i].live()[0]) for i in removed_out)  # 1 ms per half width, x2
    assert abs(latency.peek(name, 1) - expected) < 1e-9
    latency.take(name, 1)
    assert abs(latency.peek(name, 1) - expected) < 1e-9  # the curve is linear on this segment


class _Prices:
    def __init__(self, per_channel: dict[str, float]) -> None:
        self.per_channel = per_channel

    def peek(self, name: str, channels: int) -> float:
        return self.per_channel[name] * channels

    def take(self, name: str, channels: int) -> None:
        pass


def test_a_measured_target_ranks_channels_by_score_per_millisecond() -> None:
    c = [Candidate(0.2, "cheap", 0, (0,), 0.2), Candidate(0.4, "cheap", 1, (1,), 0.4)]
    c += [Candidate(0.3, "slow", 0, (0,), 0.3), Candidate(0.5, "slow", 1, (1,), 0.5)]
    c += [Candidate(0.1, "free", 0, (0,), 0.1)]
    ranked = per_price(c, _Prices({"cheap": 1.0, "slow": 10.0, "free": 0.0}), {"cheap": 1, "slow": 1, "free": 1})
    assert [(x.name, x.block) for x in ranked] == [("slow", 0), ("slow", 1), ("cheap", 0), ("cheap", 1), ("free", 0)]
