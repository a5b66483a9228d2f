"""One pruning interval: score channels, cap each layer group, remove the weakest until a cost target is met.

Torch-Pruning's dependency graph finds coupled channels (a residual sum ties the convolutions that feed it) and removes
them physically; the graph's pruning history is the one record of the architecture, replayed onto a fresh model to
restore a checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from aip.hooks import inspecting
from aip.prune.cost import model_cost, positions
from aip.prune.groups import PrunableGroup, enumerate_groups
from aip.prune.importance import needs_features, needs_gradients
from aip.prune.safety import Snapshot, mismatch, outputs, silence

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
    are measured), then either `replay` a saved history or call `prune_to` once per interval. Groups the graph cannot
    follow are left unpruned (`refused`, with the reason), and every removal step is verified: the network without
    the removed channels must compute what it computed with those channels silenced, else the step is undone.
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
        self.refused: dict[str, str] = {}
        self._history: History = []
        self._build()
        self.original_widths = {g.name: g.width for g in self._groups(include_refused=True)}
        self.caps: dict[str, float] = {}
        self.order: dict[str, float] = {}

    def _build(self) -> None:
        """Trace the model into Torch-Pruning's dependency graph (again after a removal that changed split sizes)."""
        was_training = self.model.training
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        for p in frozen:  # the graph is traced through autograd: a frozen model would show no layers
            p.requires_grad_(True)
        try:
            self.graph = tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example, verbose=False)
        except Exception as exc:  # a third-party tracer: whatever it raises means the graph is not understood
            raise PruningError(
                f"Torch-Pruning cannot trace this model ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        finally:
            self.model.train(was_training)  # tracing leaves the model in eval mode
            for p in frozen:
                p.requires_grad_(False)
        split_types = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND)
        self._has_splits = any(node.type in split_types for node in self.graph.module2node.values())

    def set_capacity(self, caps: dict[str, float], order: dict[str, float] | None = None) -> None:
        """Per-group maximum pruning ratios (tightening `max_layer_ratio`), and optionally a hierarchical order:
        groups with a lower `order` value are pruned first, each down to its cap before the next is touched."""
        self.caps = dict(caps)
        self.order = dict(order or {})

    def root_modules(self) -> dict[str, nn.Module]:
        """The root layer of every prunable group, by name."""
        return {g.name: g.root for g in self._groups()}

    def _groups(self, include_refused: bool = False) -> Iterator[PrunableGroup]:
        """Every group of coupled channels whose root is a convolution or linear layer (refused ones skipped)."""
        for name, root, group, unit, reason in enumerate_groups(self.graph, self.ignored):
            if reason is not None and name not in self.refused:
                self._refuse(name, _first_line(reason))
            if name in self.refused:
                if include_refused and group is not None:
                    yield PrunableGroup(name, root, group, 1)
                continue
            yield PrunableGroup(name, root, group, unit)

    def _refuse(self, name: str, reason: str) -> None:
        self.refused[name] = reason
        warnings.warn(f"pruning: leaving group {name} unpruned: {reason}", stacklevel=3)

    def widths(self) -> dict[str, int]:
        """Current output width of every prunable group, by the name of its root module."""
        return {g.name: g.width for g in self._groups()}

    def min_width(self, name: str) -> int:
        """The fewest channels group `name` may keep under the per-layer cap (never fewer than one)."""
        ratio = min(self.max_layer_ratio, self.caps.get(name, 1.0))
        return max(1, math.ceil(self.original_widths[name] * (1.0 - ratio) - 1e-9))

    def history(self) -> History:
        """Every removal so far as plain JSON-able lists: [root module name, is_out_channel, [channel indices]]."""
        return [[n, out, list(idxs)] for n, out, idxs in self._history]

    def replay(self, history: History) -> None:
        """Re-apply a saved history to the (unpruned) model, restoring the exact pruned architecture."""
        modules = dict(self.model.named_modules())
        for entry in history:
            try:
                name, is_out, idxs = entry
                module = modules[name]
                handler = self.graph.get_pruner_of_module(module)
                fn = handler.prune_out_channels if is_out else handler.prune_in_channels
                self.graph.get_pruning_group(module, fn, [int(i) for i in idxs]).prune(record_history=False)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise PruningError(
                    f"the pruning history does not fit this model ({_first_line(exc)}); was it saved for another?"
                ) from None
            self._history.append([str(name), bool(is_out), [int(i) for i in idxs]])
            if self._has_splits:
                self._build()

    def _candidates(
        self, importance: tp.importance.Importance, groups: list[PrunableGroup]
    ) -> list[tuple[float, str, int]]:
        """(score, group, unit) of every channel unit that may still go, lowest score first."""
        candidates: list[tuple[float, str, int]] = []
        for g in groups:
            removable = (g.width - max(self.min_width(g.name), g.unit)) // g.unit
            if removable <= 0:
                continue
            scores = self._score(importance, g)
            if scores is None:
                continue
            for idx in torch.argsort(scores, stable=True)[:removable].tolist():
                candidates.append((float(scores[idx]), g.name, idx))
        if self.order:  # hierarchical: the most redundant group first, by score within a group
            candidates.sort(key=lambda c: (self.order.get(c[1], float("inf")), c[1], c[0]))
        else:
            candidates.sort()
        return candidates

    def _score(self, importance: tp.importance.Importance, g: PrunableGroup) -> torch.Tensor | None:
        """One score per unit of the group, or None (the group refused) when the criterion cannot score it."""
        try:
            scores = importance(g.group)
        except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as exc:
            self._refuse(g.name, f"the criterion cannot score it ({_first_line(exc)})")
            return None
        if scores is None or scores.numel() != g.width:
            return None
        return g.unit_scores(torch.nan_to_num(scores.detach().float().cpu(), nan=0.0))

    @torch.no_grad()
    def _channel_costs(self, metric: str, groups: list[PrunableGroup]) -> dict[str, float]:
        """Estimated FLOPs (or parameters) that one unit of each group carries, over all its coupled layers."""
        out_sizes: dict[nn.Module, int] = {}

        def keep(mod: nn.Module, _i: object, out: torch.Tensor) -> None:
            out_sizes[mod] = positions(mod, out)

        layers = (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)
        with inspecting(self.model, {m: keep for m in self.model.modules() if isinstance(m, layers)}):
            self.model(self.example)
        costs: dict[str, float] = {}
        for g in groups:
            total = 0.0
            for dep, _ in g.group:
                module = dep.target.module
                weight = getattr(module, "weight", None)
                if module not in out_sizes or weight is None:
                    if metric == "params" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                        total += 2.0
                    continue
                out = self.graph.is_out_channel_pruning_fn(dep.handler)
                channels = self.graph.get_out_channels(module) if out else self.graph.get_in_channels(module)
                per_channel = weight.numel() / max(1, channels or 1)
                total += per_channel if metric == "params" else 2.0 * per_channel * out_sizes[module]
            costs[g.name] = total * g.unit
        return costs

    def _choose(
        self, candidates: list[tuple[float, str, int]], costs: dict[str, float], gap: float, slack: float
    ) -> dict[str, list[int]]:
        """Lowest-scored units whose estimated cost fills `gap`, skipping any that would overshoot by > `slack`."""
        chosen: dict[str, list[int]] = defaultdict(list)
        removed = 0.0
        for _, name, idx in candidates:
            if removed >= gap:
                break
            if removed + costs[name] > gap + slack:
                continue
            chosen[name].append(idx)
            removed += costs[name]
        if not chosen:  # every single unit overshoots: take the one that overshoots least
            _, name, idx = min(candidates, key=lambda c: (costs[c[1]], c[0]))
            chosen[name].append(idx)
        return chosen

    def _remove(self, chosen: dict[str, list[int]], groups: list[PrunableGroup]) -> None:
        """Remove the chosen units of each group as one verified step; when the step fails, retry group by group
        and leave every group that fails alone unpruned, with the reason."""
        by_name = {g.name: g for g in groups}
        plan = {name: by_name[name].channels(units) for name, units in chosen.items()}
        problem = self._try_remove(plan)
        if problem is None:
            return
        if len(plan) == 1:
            self._refuse(next(iter(plan)), problem)
            return
        for name, channels in plan.items():
            problem = self._try_remove({name: channels})
            if problem is not None:
                self._refuse(name, problem)

    def _group_of(self, name: str, channels: list[int]) -> tp.dependency.Group:
        module = self.graph.model.get_submodule(name)
        handler = self.graph.get_pruner_of_module(module).prune_out_channels
        return self.graph.get_pruning_group(module, handler, channels)

    def _try_remove(self, plan: dict[str, list[int]]) -> str | None:
        """Silence the planned channels, record the output, remove them, compare; undo everything on a mismatch or
        error. Torch-Pruning's new Parameters keep the old ones' requires_grad. None on success, else the reason."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        snapshot = Snapshot(self.model)
        problem = None
        try:
            for name, channels in plan.items():
                if not silence(self._group_of(name, channels), self.graph, snapshot):
                    problem = "a layer that reads these channels cannot be checked"
            reference = outputs(self.model, self.example)
            for name, channels in plan.items():
                if problem is None:
                    group = self._group_of(name, channels)  # made just before pruning: indices shift as groups go
                    if not self.graph.check_pruning_group(group):
                        problem = "Torch-Pruning's check refused it (it would empty a layer)"
                    else:
                        group.prune(record_history=False)
            if problem is None:
                problem = mismatch(reference, outputs(self.model, self.example))
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError, KeyError) as exc:
            problem = f"removing channels broke the forward pass ({_first_line(exc)})"
        if problem is not None:
            snapshot.restore()
        else:
            self._history.extend([name, True, channels] for name, channels in plan.items())
        if self._has_splits:  # Torch-Pruning fixes split sizes when tracing: trace the new shapes again
            self._build()
        for name, param in self.model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        return problem

    def prune_to_widths(self, widths: dict[str, int], importance: tp.importance.Importance) -> None:
        """Shrink each named group to about the given width (a whole number of units, at least one), dropping its
        lowest-scored units."""
        for name, width in widths.items():
            g = next((g for g in self._groups() if g.name == name), None)
            if g is None:
                continue
            excess = round((g.width - max(g.unit, int(width))) / g.unit)
            if excess > 0:
                scores = self._score(importance, g)
                if scores is None:
                    continue
                self._remove({name: torch.argsort(scores, stable=True)[:excess].tolist()}, [g])
        self.model.zero_grad(set_to_none=True)

    def cost(self, metric: str) -> float:
        """The model's current FLOPs or parameter count."""
        c = model_cost(self.model, self.example)
        return float(c.flops if metric == "flops" else c.params)

    def _calibrate_gradients(self, importance: tp.importance.Importance, calibrate: Callable | None) -> None:
        """Fill `.grad` from calibration batches when the criterion reads `.grad` (a recording criterion such as
        `taylor` records its gradients itself, in `_record_features`)."""
        if needs_gradients(importance) and not needs_features(importance):
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
            groups = list(self._groups())
            candidates = self._candidates(importance, groups)
            if not candidates:
                raise PruningError(
                    f"cannot reach the target: the {metric} are still {current / before:.3f} of the interval's start "
                    f"with every layer at its cap (prune.max_layer_ratio={self.max_layer_ratio}"
                    + (", and the capacity limits of prune.capacity" if self.caps else "")
                    + "); raise the cap or the target ratio"
                )
            costs = self._channel_costs(metric, groups)
            gap = current - target
            if self.order:  # the next group in line takes what it can before the next one is touched
                first = candidates[0][1]
                candidates = [c for c in candidates if c[1] == first]
                gap = min(gap, costs[first] * len(candidates))
            self._remove(self._choose(candidates, costs, gap, tolerance * target), groups)
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
        groups = list(self._groups())
        candidates = [c for c in self._candidates(importance, groups) if c[0] < threshold]
        steps = 0
        if candidates and before > floor:
            costs = self._channel_costs(metric, groups)
            self._remove(self._choose(candidates, costs, before - floor, tolerance * floor), groups)
            steps = 1
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return IntervalLog(before, self.cost(metric), floor, steps, widths_before, self.widths())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
