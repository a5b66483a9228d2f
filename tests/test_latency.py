"""Latency targets: the pruner prunes until the measured latency meets the target, pricing channels from layer
times; a run with prune.target_latency_ratio reports the latency of each stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml

from aip.models import classifier_of, create_model
from aip.prune.importance import create_importance
from aip.prune.latency import LatencyTable, layer_times, measure_latency, relative_latency
from aip.prune.pruner import ChannelPruner
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
    table = LatencyTable(pruner.width_cost(), times, total)
    assert set(table.slopes) == set(pruner.widths()) and all(s > 0 for s in table.slopes.values())
    assert pruner.model.training  # the mode is restored
    twin = copy.deepcopy(pruner.model).train()
    assert 0.5 < relative_latency(pruner.model, twin, x, warmup=1, repeats=5) < 2.0
    assert pruner.model.training and twin.training


def test_a_run_with_a_latency_target_reports_the_latency_of_each_stage(tmp_path: Path) -> None:
    overrides = {"prune.target_flops_ratio": None, "prune.target_latency_ratio": 0.6, "prune.finetune_epochs": 0}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**overrides)))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"]["latency_ms"] > 0 and "latency" not in report["teacher"]
    assert all(s["latency_ms"] > 0 for s in report["stages"])
    log = json.loads((tmp_path / "run" / "pruning_log.json").read_text())
    assert [e["metric"] for e in log] == ["latency", "latency"]
    assert log[-1]["ratio_after"] <= 0.6 and report["stages"][-1]["flops"] < report["teacher"]["flops"]
