"""One pruning interval: score channels, cap each layer group, remove the weakest until a cost target is met.

Torch-Pruning's dependency graph finds coupled channels (a residual sum ties the convolutions that feed it) and removes
them physically; the graph's pruning history is the one record of the architecture, replayed onto a fresh model to
restore a checkpoint.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from aip.hooks import inspecting
from aip.prune.cost import model_cost
from aip.prune.importance import needs_features, needs_gradients

History = list[list]


class PruningError(RuntimeError):
    """The target cannot be met under the per-layer caps, or a history does not fit the model."""


@dataclass
class IntervalLog:
    """What one interval did: the cost before and after, and each group's width before and after."""

    cost_before: float
    cost_after: float
    target: float
    steps: int
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)


class ChannelPruner:
    """Removes channels of `model` in place through one dependency graph that lives as long as the model.

    Build it on the unpruned model (it records each group's original width, against which `max_layer_ratio` caps
    are measured), then either `replay` a saved history or call `prune_to` once per interval.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        ignored_layers: list[nn.Module],
        max_layer_ratio: float = 0.8,
    ) -> None:
        self.model = model
        self.example = example_inputs
        self.max_layer_ratio = max_layer_ratio
        self.ignored = [m for layer in ignored_layers for m in layer.modules()]
        was_training = model.training
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:  # the graph is traced through autograd: a frozen model would show no layers
            p.requires_grad_(True)
        try:
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        finally:
            model.train(was_training)  # tracing leaves the model in eval mode
            for p in frozen:
                p.requires_grad_(False)
        self.original_widths = self.widths()
        self.caps: dict[str, float] = {}
        self.order: dict[str, float] = {}

    def set_capacity(self, caps: dict[str, float], order: dict[str, float] | None = None) -> None:
        """Per-group maximum pruning ratios (tightening `max_layer_ratio`), and optionally a hierarchical order:
        groups with a lower `order` value are pruned first, each down to its cap before the next is touched."""
        self.caps = dict(caps)
        self.order = dict(order or {})

    def root_modules(self) -> dict[str, nn.Module]:
        """The root layer of every prunable group, by name."""
        return {name: root for name, root, _ in self._groups()}

    def _groups(self) -> Iterator[tuple[str, nn.Module, tp.dependency.Group]]:
        for group in self.graph.get_all_groups(
            ignored_layers=self.ignored, root_module_types=[tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR]
        ):
            root = group[0].dep.target.module
            yield self.graph._module2name[root], root, group

    def widths(self) -> dict[str, int]:
        """Current output width of every prunable group, by the name of its root module."""
        return {name: len(group[0].idxs) for name, _, group in self._groups()}

    def min_width(self, name: str) -> int:
        """The fewest channels group `name` may keep under the per-layer cap (never fewer than one)."""
        ratio = min(self.max_layer_ratio, self.caps.get(name, 1.0))
        return max(1, math.ceil(self.original_widths[name] * (1.0 - ratio) - 1e-9))

    def history(self) -> History:
        """The Torch-Pruning history as plain JSON-able lists: [module name, is_out_channel, [indices]]."""
        return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in self.graph.pruning_history()]

    def replay(self, history: History) -> None:
        """Re-apply a saved history to the (unpruned) model, restoring the exact pruned architecture."""
        try:
            self.graph.load_pruning_history([list(item) for item in history])
        except (AttributeError, IndexError, KeyError) as exc:
            raise PruningError(
                f"the pruning history does not fit this model ({exc}); was it saved for another?"
            ) from exc

    def _candidates(self, importance: tp.importance.Importance) -> list[tuple[float, str, int]]:
        """(score, group, channel) of every channel that may still go, lowest score first."""
        candidates: list[tuple[float, str, int]] = []
        for name, _, group in self._groups():
            removable = len(group[0].idxs) - self.min_width(name)
            if removable <= 0:
                continue
            scores = importance(group)
            if scores is None:
                continue
            scores = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0)
            for idx in torch.argsort(scores, stable=True)[:removable].tolist():
                candidates.append((float(scores[idx]), name, idx))
        if self.order:  # hierarchical: the most redundant group first, by score within a group
            candidates.sort(key=lambda c: (self.order.get(c[1], float("inf")), c[1], c[0]))
        else:
            candidates.sort()
        return candidates

    @torch.no_grad()
    def _channel_costs(self, metric: str) -> dict[str, float]:
        """Estimated FLOPs (or parameters) that one channel of each group carries, over all its coupled layers."""
        out_sizes: dict[nn.Module, int] = {}

        def keep(mod: nn.Module, _i: object, out: torch.Tensor) -> None:
            out_sizes[mod] = math.prod(out.shape[2:]) or 1

        layers = (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)
        with inspecting(self.model, {m: keep for m in self.model.modules() if isinstance(m, layers)}):
            self.model(self.example)
        costs: dict[str, float] = {}
        for name, _, group in self._groups():
            total = 0.0
            for dep, _ in group:
                module = dep.target.module
                weight = getattr(module, "weight", None)
                if module not in out_sizes or weight is None:
                    if metric == "params" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                        total += 2.0
                    continue
                axis = 0 if self.graph.is_out_channel_pruning_fn(dep.handler) else 1
                per_channel = weight.numel() / weight.shape[axis]
                total += per_channel if metric == "params" else 2.0 * per_channel * out_sizes[module]
            costs[name] = total
        return costs

    def _choose(
        self, candidates: list[tuple[float, str, int]], costs: dict[str, float], gap: float, slack: float
    ) -> dict[str, list[int]]:
        """Lowest-scored channels whose estimated cost fills `gap`, skipping any that would overshoot by > `slack`."""
        chosen: dict[str, list[int]] = defaultdict(list)
        removed = 0.0
        for _, name, idx in candidates:
            if removed >= gap:
                break
            if removed + costs[name] > gap + slack:
                continue
            chosen[name].append(idx)
            removed += costs[name]
        if not chosen:  # every single channel overshoots: take the one that overshoots least
            _, name, idx = min(candidates, key=lambda c: (costs[c[1]], c[0]))
            chosen[name].append(idx)
        return chosen

    def _remove(self, chosen: dict[str, list[int]]) -> None:
        """Prune the chosen channels; Torch-Pruning's new Parameters keep the old ones' requires_grad."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        modules = dict(self.model.named_modules())
        for name, idxs in chosen.items():
            root = modules[name]
            handler = self.graph.get_pruner_of_module(root).prune_out_channels
            group = self.graph.get_pruning_group(root, handler, sorted(idxs))
            if self.graph.check_pruning_group(group):
                group.prune()
        for name, param in self.model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)

    def prune_to_widths(self, widths: dict[str, int], importance: tp.importance.Importance) -> None:
        """Shrink each named group to the given width, dropping its lowest-scored channels (never below one)."""
        for name, width in widths.items():
            for group_name, _, group in self._groups():
                if group_name != name:
                    continue
                excess = len(group[0].idxs) - max(1, int(width))
                if excess > 0:
                    scores = torch.nan_to_num(importance(group).detach().float().cpu(), nan=0.0)
                    self._remove({name: torch.argsort(scores, stable=True)[:excess].tolist()})
                break
        self.model.zero_grad(set_to_none=True)

    def cost(self, metric: str) -> float:
        """The model's current FLOPs or parameter count."""
        c = model_cost(self.model, self.example)
        return float(c.flops if metric == "flops" else c.params)

    def _calibrate_gradients(self, importance: tp.importance.Importance, calibrate: Callable | None) -> None:
        """Fill `.grad` from calibration batches when the criterion reads gradients."""
        if needs_gradients(importance):
            if calibrate is None:
                raise PruningError("this criterion reads gradients: pass a calibrate function that fills .grad")
            self.model.zero_grad(set_to_none=True)
            calibrate(self.model)

    def _record_features(self, importance: tp.importance.Importance, calibrate: Callable | None) -> None:
        """Record the current model's feature maps on calibration batches when the criterion reads them."""
        if needs_features(importance):
            if calibrate is None:
                raise PruningError("this criterion reads feature maps: pass a calibrate function")
            with importance.recording(self.model):
                calibrate(self.model)
            self.model.zero_grad(set_to_none=True)

    def prune_to(
        self,
        target: float,
        metric: str,
        importance: tp.importance.Importance,
        calibrate: Callable[[nn.Module], None] | None = None,
        tolerance: float = 0.02,
    ) -> IntervalLog:
        """Remove the lowest-scored channels, globally ranked and capped per group, until the cost <= `target`.

        `metric` is "flops" or "params". Each step re-scores the channels and removes those whose estimated cost
        fills the remaining gap; a channel that would overshoot the target by more than `tolerance` of it is passed
        over for the next one, so narrow, expensive layers do not push the result far below the target.
        """
        was_training = self.model.training
        self._calibrate_gradients(importance, calibrate)
        widths_before = self.widths()
        before = current = self.cost(metric)
        steps = 0
        while current > target:
            self._record_features(importance, calibrate)  # feature maps of the current (partly pruned) model
            candidates = self._candidates(importance)
            if not candidates:
                raise PruningError(
                    f"cannot reach the target: the {metric} are still {current / before:.3f} of the interval's start "
                    f"with every layer at its cap (prune.max_layer_ratio={self.max_layer_ratio}"
                    + (", and the capacity limits of prune.capacity" if self.caps else "")
                    + "); raise the cap or the target ratio"
                )
            costs = self._channel_costs(metric)
            gap = current - target
            if self.order:  # the next group in line takes what it can before the next one is touched
                first = candidates[0][1]
                candidates = [c for c in candidates if c[1] == first]
                gap = min(gap, costs[first] * len(candidates))
            self._remove(self._choose(candidates, costs, gap, tolerance * target))
            current = self.cost(metric)
            steps += 1
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return IntervalLog(before, current, target, steps, widths_before, self.widths())

    def prune_below(
        self,
        threshold: float,
        floor: float,
        metric: str,
        importance: tp.importance.Importance,
        calibrate: Callable[[nn.Module], None] | None = None,
        tolerance: float = 0.02,
    ) -> IntervalLog:
        """Remove, in one step, every channel scored under `threshold` (per-group caps hold), lowest first, but
        never take the cost below `floor`. For criteria with absolute scores, such as `activation`."""
        was_training = self.model.training
        self._calibrate_gradients(importance, calibrate)
        self._record_features(importance, calibrate)
        widths_before = self.widths()
        before = self.cost(metric)
        candidates = [c for c in self._candidates(importance) if c[0] < threshold]
        steps = 0
        if candidates and before > floor:
            self._remove(self._choose(candidates, self._channel_costs(metric), before - floor, tolerance * floor))
            steps = 1
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return IntervalLog(before, self.cost(metric), floor, steps, widths_before, self.widths())
