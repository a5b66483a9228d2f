"""Timing helpers of the speed benchmark: medians after warm-up, in turns on a shared machine, and pruned copies."""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from torch import nn

from aip.models import classifier_of
from aip.prune.cost import model_cost
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes) and core count, to print next to the figures."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time in seconds of each function, timed in turns (one call of each per round), so that a slow
    phase of a shared machine weighs on all of them alike rather than on whichever ran then."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def pruned_copy(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int = 1) -> nn.Module:
    """A copy of `model` pruned by L1 to `ratio` of its FLOPs (widths multiples of `round_to`)."""
    model = copy.deepcopy(model)
    pruner = ChannelPruner(model, example, [classifier_of(model)], max_layer_ratio=0.9, round_to=round_to)
    pruner.prune_to(ratio * model_cost(model, example).flops, "flops", create_importance("l1"))
    return model
