"""Latency targets: measured time of the student instead of its FLOPs, and a per-group price of a channel in seconds.

`measure_latency` times whole forward passes (eval mode, inference_mode, warm-up, median of repeats);
`relative_latency` times a student and its teacher in turns, which holds on a machine whose load changes. `layer_times`
times each conv and linear layer inside such passes (forward hooks). `LatencyTable` turns those into a price per
channel of every group: each layer's measured time, interpolated linearly in its FLOPs (so one channel of a layer
costs its time times the share of its FLOPs that channel carries), summed over the group's layers, and scaled so
the layers' times account for the whole measured forward (normalisations, activations and sums shrink with the
channels too). The pruner ranks channels by importance, takes them until their price fills the gap to the target,
then measures again: the table is an estimate, the measurement decides. Nothing here knows about processes: a
caller running several passes its own callables (rank 0 measures, the others receive its figures).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from aip.prune.widths import WidthCost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, inputs: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of one forward of `inputs` in eval mode under inference_mode; the mode is restored."""
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(inputs.device)
                start = time.perf_counter()
                model(inputs)
                _sync(inputs.device)
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - start))
    finally:
        model.train(was_training)
    return statistics.median(times)


def relative_latency(
    model: nn.Module, reference: nn.Module, inputs: torch.Tensor, warmup: int = 3, repeats: int = 10
) -> float:
    """The median latency of `model` over that of `reference` on `inputs`, the two timed in turns (eval mode,
    inference_mode), so that a shared machine's changing load weighs on both alike; the modes are restored."""
    modes = [model.training, reference.training]
    model.eval()
    reference.eval()
    times: tuple[list[float], list[float]] = ([], [])
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                for net, spent in zip((model, reference), times, strict=True):
                    _sync(inputs.device)
                    start = time.perf_counter()
                    net(inputs)
                    _sync(inputs.device)
                    if i >= warmup:
                        spent.append(time.perf_counter() - start)
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    return statistics.median(times[0]) / statistics.median(times[1])


def layer_times(model: nn.Module, layers: list[nn.Module], inputs: torch.Tensor, repeats: int = 5) -> list[float]:
    """Median milliseconds each of `layers` takes inside forward passes of `inputs` (after one warm-up pass)."""
    spent: dict[nn.Module, list[float]] = defaultdict(list)
    started: dict[nn.Module, float] = {}

    def before(module: nn.Module, _inputs: object) -> None:
        _sync(inputs.device)
        started[module] = time.perf_counter()

    def after(module: nn.Module, _inputs: object, _out: object) -> None:
        _sync(inputs.device)
        spent[module].append(1000.0 * (time.perf_counter() - started[module]))

    handles = [m.register_forward_pre_hook(before) for m in layers]
    handles += [m.register_forward_hook(after) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(repeats + 1):
                model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [statistics.median(spent[m][1:]) if len(spent[m]) > 1 else 0.0 for m in layers]


class LatencyTable:
    """Milliseconds per channel of each group, from the layers' measured times (`times`, in the order of
    `table.layers`) and the whole forward's measured `total`."""

    def __init__(self, table: WidthCost, times: list[float], total: float) -> None:
        pricer = table.pricer("flops")
        scale = total / max(sum(times), 1e-9)
        self.slopes: dict[str, float] = {}
        for name, touched in pricer.touches.items():
            slope = 0.0
            for i in touched:
                flops = pricer._value(i, *pricer.sizes[i])
                if flops > 0:
                    carried = flops - pricer._value(i, *pricer._after(i, name, 1))
                    slope += times[i] * carried / flops
            self.slopes[name] = slope * scale

    def peek(self, name: str, channels: int) -> float:
        """The milliseconds that removing `channels` channels of group `name` saves, by the table."""
        return self.slopes.get(name, 0.0) * channels

    def take(self, name: str, channels: int) -> None:
        """Nothing to track: the table is linear in each group's width."""
