"""Speed of pruning itself: one interval per criterion on ResNet-50, and a latency target reached on the machine
that runs it.

Sections (iii) and (v) of `benchmarks/speed.py`, which runs them and writes their tables (`interval_lines`,
`target_lines`); section (iv), what `prune.round_to` does to latency, is `benchmarks/speed_rounding.py`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from aip.models import classifier_of, create_model
from aip.prune.importance import create_importance
from aip.prune.latency import LatencyTable, layer_curves, layer_times, measure_latency, relative_latency
from aip.prune.pruner import ChannelPruner
from benchmarks.timing import load, sync

INTERVAL_CRITERIA = ("l1", "taylor", "activation", "similarity")


def interval_times(
    device: str, criteria: tuple[str, ...] = INTERVAL_CRITERIA, calibration: int = 4, repeats: int = 5
) -> list[dict]:
    """(iii): one pruning interval on torchvision ResNet-50 at 224x224 to 80% of its FLOPs, per criterion (similarity
    on feature maps), its parts timed apart: dependency graph, one-time cost model and check example, the interval
    (its calibration passes on one batch of `calibration` images timed on their own), re-prepare. Each criterion
    runs `repeats` times on fresh copies: the row is the fastest try (by CPU seconds: what the interval takes when no
    other process interferes, timeit's rule), with the median wall and CPU seconds beside it (this machine as
    loaded)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu")
    torch.manual_seed(0)
    teacher = create_model("torchvision:resnet50", 1000)
    example = torch.randn(1, 3, 224, 224, device=acc.device)
    batch = (
        torch.randn(calibration, 3, 224, 224, device=acc.device),
        torch.randint(0, 1000, (calibration,), device=acc.device),
    )
    rows, machine_load = [], load()
    for criterion in criteria:
        tries = [_one_interval(acc, teacher, example, batch, criterion) for _ in range(repeats)]
        best = min(tries, key=lambda t: t["interval_cpu_s"])
        row = {
            **best,
            "threads": torch.get_num_threads(),
            "load": machine_load,
            "criterion": criterion + (" (features)" if criterion == "similarity" else ""),
            "model": "torchvision:resnet50",
            "input": 224,
            "repeats": repeats,
            "calibration_images": calibration if best["calibration_passes"] else 0,
        }
        for key in ("interval_s", "interval_cpu_s"):  # the rest of the row is the fastest try's
            row[key.replace("_s", "_median_s")] = sorted(t[key] for t in tries)[len(tries) // 2]
        rows.append(row)
        print(
            f"interval {criterion}: {row['interval_s']:.2f} s ({row['interval_cpu_s']:.2f} s CPU, min of {repeats}; "
            f"median {row['interval_median_s']:.2f} s), {best['removal_steps']} step(s), calibration "
            f"{row['calibration_s']:.2f} s in {best['calibration_passes']} pass(es)",
            flush=True,
        )
    return rows


def _one_interval(acc: Any, teacher: nn.Module, example: torch.Tensor, batch: tuple, criterion: str) -> dict:
    """One interval of `criterion` on a fresh copy of `teacher`: its parts' seconds."""
    from aip.config import PruneConfig, SimilarityConfig

    x, y = batch
    model = copy.deepcopy(teacher).to(acc.device).train()
    spent = {"wall": 0.0, "passes": 0}

    def calibrate(m: nn.Module) -> None:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(m(x), y)
        if loss.requires_grad:
            loss.backward()
        sync(acc.device.type)
        spent["wall"] += time.perf_counter() - start
        spent["passes"] += 1

    start = time.perf_counter()
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.8)
    graph = time.perf_counter() - start
    start = time.perf_counter()
    pruner.prepare()
    base = pruner.cost("flops")
    setup = time.perf_counter() - start
    importance = create_importance(criterion, PruneConfig(similarity=SimilarityConfig("features")))
    cpu, start = time.process_time(), time.perf_counter()
    log = pruner.prune_to(0.8 * base, "flops", importance, calibrate)
    prune, cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    acc.free_memory()
    acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    return {
        "flops_ratio_after": log.cost_after / base,
        "removal_steps": log.steps,
        "analytic_cost": bool(pruner.analytic),
        "graph_s": graph,
        "setup_s": setup,
        "interval_s": prune,
        "interval_cpu_s": cpu,
        "calibration_passes": spent["passes"],
        "calibration_s": spent["wall"],
        "re_prepare_s": time.perf_counter() - start,
    }


def latency_target(
    device: str, ratio: float = 0.5, batch: int = 32, round_tos: tuple[int, ...] = (1, 8), checks: int = 3
) -> list[dict]:
    """(v): CIFAR ResNet-56 pruned by L1 until its latency (eval, inference_mode, batch `batch`, timed in turns with
    the unpruned network) is at most `ratio` of the unpruned network's, as `prune.target_latency_ratio` prunes: each
    layer's curve measured once, layer times at every step, channels ranked per millisecond saved; then the ratio
    measured `checks` times more."""
    torch.manual_seed(0)
    base = create_model("cifar_resnet56", 10).to(device).eval()
    example, x = torch.randn(1, 3, 32, 32, device=device), torch.randn(batch, 3, 32, 32, device=device)
    rows = []
    for round_to in round_tos:
        row = {**_to_latency(base, example, x, ratio, round_to, checks), "batch": batch, "target": ratio}
        rows.append(row)
        print(
            f"latency target {ratio} (round_to {round_to}): {row['steps']} step(s), {row['prune_s']:.1f} s "
            f"(+{row['curves_s']:.1f} s curves), reached {row['reached']:.3f}, again "
            f"{', '.join(f'{a:.3f}' for a in row['measured_again'])}, FLOPs {row['flops_ratio']:.3f}",
            flush=True,
        )
    return rows


def _to_latency(
    base: nn.Module, example: torch.Tensor, x: torch.Tensor, ratio: float, round_to: int, checks: int
) -> dict:
    """A copy of `base` pruned by L1 to `ratio` of its latency on `x`: what it took and what it reached."""
    from aip.prune.cost import model_cost

    model = copy.deepcopy(base)
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.9, round_to=round_to)
    table = pruner.width_cost()
    layers = [layer.module for layer in table.layers]
    start = time.perf_counter()
    curves = layer_curves(model, layers, x)
    curves_s, start = time.perf_counter() - start, time.perf_counter()
    base_ms = measure_latency(base, x)

    measured: list[float] = []  # as the trainer: the table reuses the latency measured just before it prices

    def measure() -> float:
        measured.append(base_ms * relative_latency(model, base, x))
        return measured[-1]

    def pricer(_: str) -> LatencyTable:
        return LatencyTable(table, layer_times(model, layers, x), measured[-1], curves)

    log = pruner.prune_to(ratio * base_ms, "latency", create_importance("l1"), measure=measure, pricer=pricer)
    prune_s = time.perf_counter() - start
    return {
        "round_to": round_to,
        "steps": log.steps,
        "curves_s": curves_s,
        "prune_s": prune_s,
        "reached": log.cost_after / base_ms,
        "measured_again": [relative_latency(model, base, x) for _ in range(checks)],
        "flops_ratio": model_cost(model, example).flops / model_cost(base, example).flops,
        "threads": torch.get_num_threads(),
    }


def target_lines(rows: list[dict], run: str) -> list[str]:
    """The markdown table of section (v); `run` says how and when it ran."""
    lines = [
        "",
        f"## A latency target (CIFAR ResNet-56, L1, {rows[0]['target']} of the unpruned network's latency)",
        "",
        f"Run: {run}. {rows[0]['threads']} thread(s); eval, inference_mode, batch {rows[0]['batch']}; the student and "
        "the unpruned network timed in turns. Curves: each layer timed alone at a few widths, once; prune: the "
        "removal steps with their measurements; measured again: the latency ratio timed anew after the prune.",
        "",
        "| round_to | steps | curves | prune | reached | measured again | FLOPs ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        again = ", ".join(f"{a:.3f}" for a in r["measured_again"])
        lines.append(
            f"| {r['round_to']} | {r['steps']} | {r['curves_s']:.1f} s | {r['prune_s']:.1f} s | {r['reached']:.3f} "
            f"| {again} | {r['flops_ratio']:.3f} |"
        )
    return lines


def interval_lines(rows: list[dict], run: str) -> list[str]:
    """The markdown table of section (iii); `run` says how and when it ran."""
    lines = [
        "",
        "## One pruning interval (torchvision ResNet-50, 224px, to 80% FLOPs)",
        "",
        f"Run: {run}. {rows[0]['threads']} thread(s). Interval = score + remove, with the "
        "calibration passes of the data-driven criteria (also shown alone); CPU = the process's CPU seconds. Each "
        f"criterion ran {rows[0].get('repeats', 1)} times on fresh copies: the row is the fastest (least CPU) try, "
        "what the interval takes when nothing else competes for the cores and caches, with the median wall and CPU "
        "seconds as loaded; the graph and "
        "the one-time setup (analytic cost model checked against the FLOP counter, check example) come once per "
        "run, not per interval.",
        "",
        "| criterion | steps | interval (min) | interval CPU (min) | median wall / CPU | calibration "
        "| interval - calibration | graph | setup | re-prepare |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in rows:
        calib = "-"
        if i["calibration_passes"]:
            calib = f"{i['calibration_s']:.2f} s ({i['calibration_passes']} x {i['calibration_images']} images)"
        lines.append(
            f"| {i['criterion']} | {i['removal_steps']} | {i['interval_s']:.2f} s | {i['interval_cpu_s']:.2f} s "
            f"| {i.get('interval_median_s', i['interval_s']):.2f} s / "
            f"{i.get('interval_cpu_median_s', i['interval_cpu_s']):.2f} s | {calib} "
            f"| {i['interval_s'] - i['calibration_s']:.2f} s | {i['graph_s']:.2f} s | {i['setup_s']:.2f} s "
            f"| {i['re_prepare_s']:.3f} s |"
        )
    return lines
