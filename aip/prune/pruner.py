"""One pruning interval: score channels, cap each layer group, remove the weakest until a cost target is met.

Torch-Pruning's dependency graph finds coupled channels (a residual sum ties the convolutions that feed it) and removes
them physically; the graph's pruning history is the one record of the architecture, replayed onto a fresh model to
restore a checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from aip.prune.cost import model_cost
from aip.prune.groups import PrunableGroup, enumerate_groups
from aip.prune.importance import needs_features, needs_gradients
from aip.prune.rounding import WidthGrid
from aip.prune.safety import Snapshot, check_example, first_line, mismatch, outputs, silence
from aip.prune.selection import Candidate, Pricer, choose, group_candidates, per_price, rank
from aip.prune.widths import WidthCost

History = list[list]
LANDING_SLACK = 0.002  # a cut may end this share of its target under it (a looser one hands the student less budget)


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

    Costs come from the analytic model (`WidthCost`), which prices each removal exactly, so a step needs no cost
    forward; it is compared with torch's FLOP counter once, and where they differ (layers it cannot price) the
    counter measures the cost after each step instead (`analytic=False` forces that). With `round_to` N > 1 every
    pruned group keeps a width that is a multiple of N (see `rounding`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        ignored_layers: list[nn.Module],
        max_layer_ratio: float = 0.8,
        round_to: int = 1,
        analytic: bool = True,
    ) -> None:
        self.model = model
        self.example = example_inputs
        self.max_layer_ratio = max_layer_ratio
        self.round_to = max(1, int(round_to))
        self.ignored = [m for layer in ignored_layers for m in layer.modules()]
        self.refused: dict[str, str] = {}
        self._history: History = []
        self._enumerated: list[tuple] | None = None
        self._build()
        every = list(self._groups(include_refused=True))
        self.original_widths = {g.name: g.width for g in every}
        self.units = {g.name: g.unit for g in every}
        self.caps: dict[str, float] = {}
        self.order: dict[str, float] = {}
        self.analytic: bool | None = None if analytic else False  # None: not yet compared with the counter
        self._width_cost: WidthCost | None = None
        self._check: torch.Tensor | None = None

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
                f"Torch-Pruning cannot trace this model ({type(exc).__name__}: {first_line(exc)})"
            ) from None
        finally:
            self._enumerated = None
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
        """Every group of coupled channels whose root is a convolution or linear layer (refused ones skipped); the
        enumeration is kept until the model changes."""
        if self._enumerated is None:
            self._enumerated = list(enumerate_groups(self.graph, self.ignored))
            self._roots = {name: root for name, root, *_ in self._enumerated}
        known = getattr(self, "original_widths", None)  # None while the constructor enumerates the groups
        for name, root, group, unit, reason in self._enumerated:
            if known is not None and name not in known and reason is None:
                reason = "an earlier removal regrouped its channels (the graph couples them differently now)"
            if reason is not None and name not in self.refused:
                self._refuse(name, first_line(reason))
            if name in self.refused:
                if include_refused and group is not None:
                    yield PrunableGroup(name, root, group, 1)
                continue
            yield PrunableGroup(name, root, group, unit)

    def _refuse(self, name: str, reason: str) -> None:
        self.refused[name] = reason
        warnings.warn(f"pruning: leaving group {name} unpruned: {reason}", stacklevel=3)

    def widths(self) -> dict[str, int]:
        """Current output width of every prunable group, by the name of its root module (read off the roots)."""
        return {
            name: int(self.graph.get_out_channels(root))
            for name, root in self._roots.items()
            if name not in self.refused and name in self.original_widths
        }

    def min_width(self, name: str) -> int:
        """The fewest channels group `name` may keep under the per-layer cap and `round_to` (at least one unit)."""
        return self.grid(name).low

    def grid(self, name: str) -> WidthGrid:
        """The widths group `name` may take under the per-layer cap and `round_to`."""
        ratio = min(self.max_layer_ratio, self.caps.get(name, 1.0))
        floor = max(1, math.ceil(self.original_widths[name] * (1.0 - ratio) - 1e-9))
        return WidthGrid.make(self.original_widths[name], self.units.get(name, 1), self.round_to, floor)

    def history(self) -> History:
        """Every removal so far as plain JSON-able lists: [root module name, is_out_channel, [channel indices]]."""
        return [[n, out, list(idxs)] for n, out, idxs in self._history]

    def replay(self, history: History) -> None:
        """Re-apply a saved history to the (unpruned) model, restoring the exact pruned architecture."""
        modules = dict(self.model.named_modules())
        self._enumerated = None
        for entry in history:
            try:
                name, is_out, idxs = entry
                module = modules[name]
                handler = self.graph.get_pruner_of_module(module)
                fn = handler.prune_out_channels if is_out else handler.prune_in_channels
                self.graph.get_pruning_group(module, fn, [int(i) for i in idxs]).prune(record_history=False)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise PruningError(
                    f"the pruning history does not fit this model ({first_line(exc)}); was it saved for another?"
                ) from None
            self._history.append([str(name), bool(is_out), [int(i) for i in idxs]])
            if self._has_splits:
                self._build()

    def _candidates(self, importance: tp.importance.Importance, groups: list[PrunableGroup]) -> list[Candidate]:
        """Every block of units that may still go, ranked (hierarchical order first, when set)."""
        candidates: list[Candidate] = []
        for g in groups:
            grid = self.grid(g.name)
            if not grid.below(g.width):
                continue
            scores = self._score(importance, g)
            if scores is None:
                continue
            candidates += group_candidates(g.name, scores, g.width, g.unit, grid)
        return rank(candidates, self.order)

    def _score(self, importance: tp.importance.Importance, g: PrunableGroup) -> torch.Tensor | None:
        """One score per unit of the group, or None (the group refused) when the criterion cannot score it."""
        try:
            scores = importance(g.group)
        except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as exc:
            self._refuse(g.name, f"the criterion cannot score it ({first_line(exc)})")
            return None
        if scores is None or scores.numel() != g.width:
            return None
        return g.unit_scores(torch.nan_to_num(scores.detach().float().cpu(), nan=0.0))

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
        if self._check is None:
            self._check = check_example(self.model, self.example)
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        snapshot = Snapshot(self.model, self.graph)
        problem = None
        try:
            for name, channels in plan.items():
                if not silence(self._group_of(name, channels), self.graph, snapshot):
                    problem = "a layer that reads these channels cannot be checked"
            reference = outputs(self.model, self._check)
            for name, channels in plan.items():
                if problem is None:
                    group = self._group_of(name, channels)  # made just before pruning: indices shift as groups go
                    if not self.graph.check_pruning_group(group):
                        problem = "Torch-Pruning's check refused it (it would empty a layer)"
                    else:
                        group.prune(record_history=False)
            if problem is None:
                problem = mismatch(reference, outputs(self.model, self._check))
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError, KeyError) as exc:
            problem = f"removing channels broke the forward pass ({first_line(exc)})"
        if problem is not None:
            snapshot.restore()
        else:
            self._history.extend([name, True, channels] for name, channels in plan.items())
            self._enumerated = None
        if self._has_splits:  # Torch-Pruning fixes split sizes when tracing: trace the new shapes again
            self._build()
        for name, param in self.model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        return problem

    def prune_to_widths(self, widths: dict[str, int], importance: tp.importance.Importance) -> dict[str, int]:
        """Shrink each named group to the widest width its units and `round_to` allow at or under the given one (at
        least one unit), dropping its lowest-scored units: never wider, so never costlier, than asked. The per-layer
        caps do not apply here. Returns the named groups' widths now (wider than asked where a removal failed)."""
        for name, width in widths.items():
            g = next((g for g in self._groups() if g.name == name), None)
            if g is None:
                continue
            excess = (g.width - WidthGrid.make(g.width, g.unit, self.round_to, 1).floor(width)) // g.unit
            if excess > 0:
                scores = self._score(importance, g)
                if scores is None:
                    continue
                self._remove({name: torch.argsort(scores, stable=True)[:excess].tolist()}, [g])
        self.model.zero_grad(set_to_none=True)
        return {n: int(self.graph.get_out_channels(self._roots[n])) for n in widths if n in self._roots}

    def cost(self, metric: str) -> float:
        """The model's current FLOPs (of one forward of the example, as torch's counter counts them) or parameter
        count: from the layers' widths where the analytic model prices every layer, else from the counter."""
        if metric != "flops":
            return float(sum(p.numel() for p in self.model.parameters()))
        table = self.width_cost()
        if self.analytic:
            return table.current_flops()
        return float(model_cost(self.model, self.example).flops)

    def prepare(self) -> None:
        """Build the analytic cost model, compare it with torch's counter, and pick the verification example: the
        one-time work of the first interval, done now (else on first use)."""
        self.width_cost()
        if self._check is None:
            self._check = check_example(self.model, self.example)

    def width_cost(self) -> WidthCost:
        """The analytic cost model of this model, built on first use and then compared once with torch's counter
        (`analytic` says whether they agreed)."""
        if self._width_cost is None:
            self._width_cost = WidthCost(self)
        if self.analytic is None:
            counted = model_cost(self.model, self.example).flops
            self.analytic = abs(self._width_cost.current_flops() - counted) <= 1e-6 * max(1.0, counted)
        return self._width_cost

    def _calibrate_gradients(self, importance: tp.importance.Importance, calibrate: Callable | None) -> None:
        """Fill `.grad` from calibration batches when the criterion reads `.grad` (a recording criterion such as
        `taylor` records its gradients itself, in `_record_features`)."""
        if needs_gradients(importance) and not needs_features(importance):
            if calibrate is None:
                raise PruningError("this criterion reads gradients: pass a calibrate function that fills .grad")
            self.model.zero_grad(set_to_none=True)
            calibrate(self.model)

    def _record_features(self, importance: tp.importance.Importance, calibrate: Callable | None) -> None:
        """Record the current model's feature maps on calibration batches when the criterion reads them; for one
        that reads no gradients, under torch.no_grad (forward passes only: `calibrate` must then skip backward)."""
        if needs_features(importance):
            if calibrate is None:
                raise PruningError("this criterion reads feature maps: pass a calibrate function")
            with importance.recording(self.model), torch.set_grad_enabled(needs_gradients(importance)):
                calibrate(self.model)
            self.model.zero_grad(set_to_none=True)

    def prune_to(
        self,
        target: float,
        metric: str,
        importance: tp.importance.Importance,
        calibrate: Callable[[nn.Module], None] | None = None,
        tolerance: float = LANDING_SLACK,
        measure: Callable[[], float] | None = None,
        pricer: Callable[[str], Pricer] | None = None,
    ) -> IntervalLog:
        """Remove the lowest-scored channels, globally ranked and capped per group, until the cost <= `target`.

        `metric` is "flops" or "params" (or a measured cost: `measure()` gives it, `pricer(metric)` prices removals).
        A step scores the channels (a data-driven criterion records its calibration batches once for it) and removes
        those whose priced cost fills the remaining gap, passing over a block that would overshoot the target by more
        than `tolerance` of it (by default the cut lands within 0.2% under the target) unless nothing else closes
        the gap; under a measured cost the channels are ranked by score per unit of price (the lowest first). The
        analytic pricing is exact, so one step suffices unless a group's removal fails and is undone, or a
        hierarchical order takes the groups in turn; each further step re-scores the model.
        """
        was_training = self.model.training
        self._calibrate_gradients(importance, calibrate)
        widths_before = self.widths()
        cost = measure or (lambda: self.cost(metric))
        before = current = cost()
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
            prices, units = (pricer or self.width_cost().pricer)(metric), {g.name: g.unit for g in groups}
            if pricer is not None and not self.order:
                candidates = per_price(candidates, prices, units)
            gap = current - target
            if self.order:  # the next group in line takes what it can before the next one is touched
                first = candidates[0].name
                candidates = [c for c in candidates if c.name == first]
                gap = min(gap, prices.peek(first, sum(len(c.units) for c in candidates) * units[first]))
            self._remove(choose(candidates, prices, units, gap, tolerance * target), groups)
            current = cost()
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
        tolerance: float = LANDING_SLACK,
    ) -> IntervalLog:
        """Remove, in one step, every channel scored under `threshold` (per-group caps hold), lowest first, but
        never take the cost below `floor`. For criteria with absolute scores, such as `activation`. With
        `round_to`, a block of channels goes only when every channel of it scores under `threshold`."""
        was_training = self.model.training
        self._calibrate_gradients(importance, calibrate)
        self._record_features(importance, calibrate)
        widths_before = self.widths()
        before = self.cost(metric)
        groups = list(self._groups())
        candidates = [c for c in self._candidates(importance, groups) if c.top < threshold]
        steps = 0
        if candidates and before > floor:
            pricer, units = self.width_cost().pricer(metric), {g.name: g.unit for g in groups}
            self._remove(choose(candidates, pricer, units, before - floor, tolerance * floor, close=False), groups)
            steps = 1
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return IntervalLog(before, self.cost(metric), floor, steps, widths_before, self.widths())
