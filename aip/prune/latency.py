"""Latency targets: measured time of the student instead of its FLOPs, and what a channel of each group costs in ms.

`measure_latency` times whole forward passes (eval mode, inference_mode, warm-up, median of repeats);
`relative_latency` times a student and its teacher in turns, which holds on a machine whose load changes. `layer_times`
times each conv and linear layer inside such passes (forward hooks); `layer_curves` times each such layer on its own
at a few output and input widths, once per run (the shape of its latency against its widths, interpolated between
them). `LatencyTable` prices a removal from both: each layer's time now, moved along its curve, summed over the
group's layers, and scaled so the layers' times account for the whole measured forward (normalisations, activations
and sums shrink with the channels too). The pruner ranks channels by importance per millisecond saved, takes them
until their price fills the gap to the target, then measures again: the table is an estimate, the measurement
decides. Nothing here knows about processes: a caller running several passes its own callables (rank 0 measures,
the others receive its figures).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aip.prune.widths import WidthCost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median milliseconds of `module(x)` over `repeats` calls after `warmup` (the caller sets the modes)."""
    times = []
    for i in range(warmup + repeats):
        _sync(x.device)
        start = time.perf_counter()
        module(x)
        _sync(x.device)
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def measure_latency(model: nn.Module, inputs: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of one forward of `inputs` in eval mode under inference_mode; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _time(model, inputs, warmup, repeats)
    finally:
        model.train(was_training)


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


FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # the widths a layer is timed at, as fractions of its width at the start


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear through (xs, ys), xs ascending, extended linearly past both ends."""
    if len(xs) == 1:
        return ys[0]
    k = next((i for i in range(1, len(xs) - 1) if x < xs[i]), len(xs) - 1)
    return ys[k - 1] + (ys[k] - ys[k - 1]) * (x - xs[k - 1]) / (xs[k] - xs[k - 1])


@dataclass
class LayerCurve:
    """Milliseconds of one layer on its own at a grid of (output, input) widths, made non-decreasing in each (a
    narrower layer is never priced slower: timing noise must not make a removal look like a cost). A depthwise
    layer's input follows its output: `ins` then holds one width and the curve varies with the output alone."""

    outs: list[float]
    ins: list[float]
    ms: list[list[float]]  # [output width][input width]

    def at(self, out: float, inp: float) -> float:
        """The interpolated milliseconds at these widths."""
        return max(_interp(out, self.outs, [_interp(inp, self.ins, row) for row in self.ms]), 0.0)


def _standalone(layer: nn.Module, out: int, inp: int, depthwise: bool) -> nn.Module:
    """A fresh layer like `layer` (kind, kernel, stride, padding, groups, bias) with `out` and `inp` channels."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(inp, out, bias=bias)
    kind = next(k for k in (nn.Conv3d, nn.Conv2d, nn.Conv1d) if isinstance(layer, k))
    groups = inp if depthwise else layer.groups
    geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return kind(inp, out, *geometry, groups=groups, bias=bias, padding_mode=layer.padding_mode)


def _widths(width: int, step: int) -> list[int]:
    """The grid's widths for a layer `width` wide whose widths move in multiples of `step` (its groups)."""
    return sorted({max(step, round(f * width / step) * step) for f in FRACTIONS})


def layer_curves(
    model: nn.Module, layers: list[nn.Module], inputs: torch.Tensor, warmup: int = 1, repeats: int = 3
) -> list[LayerCurve | None]:
    """Each of `layers` timed on its own (eval, inference_mode) on inputs of the size it reads inside a forward of
    `inputs`, at the grid's output and input widths; layers alike in kind, widths, kernel, stride and input size
    share one measurement. None for a layer the grid cannot rebuild (a grouped convolution with a channel
    multiplier, or one the forward never reached): its price follows its FLOPs."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        shapes.setdefault(module, tuple(args[0].shape))

    handles = [m.register_forward_pre_hook(record) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    measured: dict[tuple, LayerCurve | None] = {}
    with torch.inference_mode():
        return [_curve(layer, shapes.get(layer), measured, warmup, repeats) for layer in layers]


def _curve(
    layer: nn.Module, shape: tuple[int, ...] | None, measured: dict, warmup: int, repeats: int
) -> LayerCurve | None:
    if shape is None:
        return None
    linear = isinstance(layer, nn.Linear)
    out0, in0 = (layer.out_features, layer.in_features) if linear else (layer.out_channels, layer.in_channels)
    groups = 1 if linear else layer.groups
    depthwise = groups > 1 and groups == in0
    if depthwise and out0 != in0:
        return None
    key = (type(layer).__name__, out0, in0, shape, str(layer)) if not linear else ("linear", out0, in0, shape)
    if key in measured:
        return measured[key]
    w = layer.weight
    outs = _widths(out0, 1 if depthwise else groups)
    ins = [in0] if depthwise else _widths(in0, groups)

    def ms(out: int, inp: int) -> float:
        module = _standalone(layer, out, out if depthwise else inp, depthwise).to(w.device, w.dtype).eval()
        size = (*shape[:-1], out if depthwise else inp) if linear else (shape[0], out if depthwise else inp, *shape[2:])
        return _time(module, torch.randn(size, device=w.device, dtype=w.dtype), warmup, repeats)

    grid = np.array([[ms(o, i) for i in ins] for o in outs])
    grid = np.maximum.accumulate(np.maximum.accumulate(grid, axis=0), axis=1)  # non-decreasing in both widths
    measured[key] = LayerCurve([float(o) for o in outs], [float(i) for i in ins], grid.tolist())
    return measured[key]


class LatencyTable:
    """What removing channels of a group saves in milliseconds. Each priced layer's time is its time measured inside
    the forward now (`times`, in the order of `table.layers`) scaled by the shape of its curve (`curves`, measured
    once: the layer alone at a few widths, interpolated; without one, its FLOPs), summed over the group's layers and
    scaled so the layers account for the whole measured forward (`total`: normalisations, activations and sums shrink
    with the channels too). Removals taken move the widths the next price is read at."""

    def __init__(
        self, table: WidthCost, times: list[float], total: float, curves: list[LayerCurve | None] | None = None
    ) -> None:
        self.pricer = table.pricer("flops")
        self.scale = total / max(sum(times), 1e-9)
        self.curves = curves or [None] * len(table.layers)
        self.anchor = []  # milliseconds per unit of the layer's curve, at the widths it was measured at
        for i, t in enumerate(times):
            shape = self._shape(i, *self.pricer.sizes[i])
            self.anchor.append(t / shape if shape > 0 else 0.0)

    def _shape(self, i: int, out: float, inp: float) -> float:
        curve = self.curves[i]
        return curve.at(out, inp) if curve is not None else self.pricer._value(i, out, inp)

    def peek(self, name: str, channels: int) -> float:
        """The milliseconds that removing `channels` more channels of group `name` saves, by the table."""
        saved = 0.0
        for i in self.pricer.touches.get(name, []):
            now, after = self.pricer.sizes[i], self.pricer._after(i, name, channels)
            saved += self.anchor[i] * (self._shape(i, *now) - self._shape(i, *after))
        return saved * self.scale

    def take(self, name: str, channels: int) -> None:
        """Account for removing `channels` channels of group `name`."""
        self.pricer.take(name, channels)
