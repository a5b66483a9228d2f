"""Channel criteria as Torch-Pruning Importance objects, filed in a registry by their config name.

Each entry is a factory taking the `prune` config and returning a `tp.importance.Importance`: called on a dependency
group, it gives one score per channel of the group's root (higher = keep). Scores are normalised per group (mean 1)
so that a global ranking across groups compares like with like. Criteria whose calibration passes must run backward
set `needs_gradients`; criteria that record something on the calibration passes set `needs_features` and record it
with `recording(model)` while the caller runs calibration batches (`taylor` sets both: it records per-batch
gradients through parameter hooks, so it reads no `.grad` and needs no call between batches). `taylor` and
`activation` gather their recorded statistics from every process when a process group is running (or through the
`gather` callable they were given, such as `Accelerator.gather`) and pool them as if one process had run every
process's batches, so all processes rank the same channels even when their calibration batches differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch_pruning as tp
from torch import nn

from aip.config import PruneConfig
from aip.prune.magnitude import MagnitudeImportance
from aip.prune.similarity import SimilarityImportance
from aip.registry import Registry

IMPORTANCES = Registry("criterion")
register_importance = IMPORTANCES.register


Gather = Callable[[torch.Tensor], torch.Tensor]  # a 1-D tensor from every process, concatenated in rank order


def needs_gradients(importance: tp.importance.Importance) -> bool:
    """True when the calibration passes must run backward (the criterion reads gradients)."""
    return bool(getattr(importance, "needs_gradients", False))


def needs_features(importance: tp.importance.Importance) -> bool:
    """True when the criterion records on calibration batches: wrap them in `importance.recording(model)`."""
    return bool(getattr(importance, "needs_features", False))


def gather_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The 1-D tensor `t` of every process of the default process group, concatenated in rank order (`t` itself
    when there is no group, or one process). A collective call: every process must make it, so a criterion that
    records on one process only (rank-0 work) must be given `gather=lambda t: t`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _gather_all(stats: dict, gather: Gather | None) -> dict:
    """Every tensor of `stats` from every process, stacked (processes, *shape), in one collective call. The keys
    and shapes must be the same on every process (the same model, the same number of calibration batches)."""
    if not stats:
        return stats
    keys = list(stats)
    flat = torch.cat([stats[k].detach().float().flatten() for k in keys])
    flat = (gather or gather_over_processes)(flat).cpu()
    flat = flat.view(-1, sum(stats[k].numel() for k in keys))
    out, at = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[:, at : at + n].reshape(-1, *stats[k].shape)
        at += n
    return out


@register_importance("l1")
def l1_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean L1 norm of each channel's weights over all coupled layers of the group."""
    return MagnitudeImportance(p=1)


@register_importance("l2")
def l2_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean L2 norm of each channel's weights over all coupled layers of the group."""
    return MagnitudeImportance(p=2)


@register_importance("bn_scale")
def bn_scale_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """|gamma| of the BatchNorm layers that follow the channel (network slimming)."""
    return tp.importance.BNScaleImportance(normalizer="mean")


_OUT_HANDLERS = (
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_batchnorm_out_channels,
    tp.prune_layernorm_out_channels,
    tp.prune_groupnorm_out_channels,
    tp.prune_instancenorm_out_channels,
)
_IN_HANDLERS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_CONSUMER_HANDLERS = (*_IN_HANDLERS, tp.prune_depthwise_conv_out_channels)  # layers that read the group's channels
_TAYLOR_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _per_channel(module: nn.Module, name: str, wg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums of the products w * g of one parameter per output channel ("out") and, for weights, per input ("in")."""
    if name != "weight" or wg.dim() == 1:
        return {"out": wg}
    groups = getattr(module, "groups", 1)
    if getattr(module, "transposed", False):  # (in, out / groups, *kernel)
        return {
            "out": wg.reshape(groups, wg.shape[0] // groups, wg.shape[1], -1).sum(dim=(1, 3)).flatten(),
            "in": wg.flatten(1).sum(dim=1),
        }
    return {
        "out": wg.flatten(1).sum(dim=1),
        "in": wg.reshape(groups, wg.shape[0] // groups, wg.shape[1], -1).sum(dim=(1, 3)).flatten(),
    }


class TaylorImportance(tp.importance.Importance):
    """Molchanov et al. 2019's first-order Taylor criterion: per calibration batch, the square of the summed w * g
    over all parameters a channel takes with it (its filters and biases, the BatchNorm scale and shift, the consumers'
    input weights), averaged over the batches.

    Per batch, not on accumulated gradients: a channel whose gradients cancel across batches (here +3, there -3)
    still changes the loss on each of them and scores high; summing |w * g| over accumulated gradients would call it
    dead. The batches are recorded by gradient hooks on the parameters inside `recording(model)`, so the caller only
    runs its calibration forward and backward passes inside it. Every process's batches count, as if one process had
    run them all (see `gather_over_processes`). Scores are normalised per group (mean 1).
    """

    needs_gradients = True
    needs_features = True

    def __init__(self, gather: Gather | None = None) -> None:
        self.gather = gather
        self.per_batch: dict[tuple[nn.Module, str], torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Record, for every backward pass while open, each layer's per-channel sums of w * g (one row per pass)."""
        self.per_batch = {}
        rows: dict[tuple[nn.Module, str], dict[int, torch.Tensor]] = {}
        batch = [-1]

        def next_batch(_module: nn.Module, _inputs: object) -> None:
            batch[0] += 1

        def hook(module: nn.Module, name: str, param: nn.Parameter) -> Callable[[torch.Tensor], None]:
            def keep(grad: torch.Tensor) -> None:
                wg = param.detach().float() * grad.detach().float()
                for axis, sums in _per_channel(module, name, wg).items():
                    row = rows.setdefault((module, axis), {})
                    step = max(batch[0], 0)
                    row[step] = row[step] + sums if step in row else sums

            return keep

        handles = [model.register_forward_pre_hook(next_batch)]
        for module in model.modules():
            if isinstance(module, _TAYLOR_LAYERS):
                for name, param in module.named_parameters(recurse=False):
                    if name in ("weight", "bias") and param.requires_grad:
                        handles.append(param.register_hook(hook(module, name, param)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        n = batch[0] + 1
        order = {m: i for i, m in enumerate(model.modules())}
        stats = {}
        for key in sorted(rows, key=lambda k: (order[k[0]], k[1])):  # the same order on every process
            by_batch = rows[key]
            some = next(iter(by_batch.values()))
            stats[key] = torch.stack([by_batch.get(i, torch.zeros_like(some)) for i in range(max(n, len(by_batch)))])
        self.per_batch = {key: every.flatten(0, 1) for key, every in _gather_all(stats, self.gather).items()}

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        width = len(group[0].idxs)
        z = None
        for item in group:
            handler = item.dep.handler
            axis = "out" if handler in _OUT_HANDLERS else "in" if handler in _IN_HANDLERS else None
            rows = self.per_batch.get((item.dep.target.module, axis))
            if rows is None:
                continue
            z = torch.zeros(rows.shape[0], width) if z is None else z
            z.index_add_(1, torch.as_tensor(list(item.root_idxs)), rows[:, torch.as_tensor(list(item.idxs))])
        if z is None:
            return None
        scores = (z**2).mean(dim=0)
        return scores / scores.mean().clamp_min(1e-12)


@register_importance("taylor")
def taylor_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Per-batch (sum of w * dL/dw over a channel's parameters)^2, averaged (Molchanov et al. 2019)."""
    return TaylorImportance()


class ActivationImportance(tp.importance.Importance):
    """Mean absolute input of each channel to the layers that read it, on calibration batches, relative to the
    0.9-quantile of those layers' channel means.

    The AIP authors' criterion: a channel that hardly ever fires carries little. What counts is what the next layer
    sees, after whatever activation sits between (a BatchNorm output of -100 is a dead channel after a ReLU, not the
    strongest one), so the inputs of the group's consumer layers (those whose input channels it prunes) are recorded
    by forward pre-hooks; the group's score per channel is the mean over its consumers. Each consumer's means are
    divided by their 0.9-quantile rather than their maximum, so one outlier channel cannot push every other under
    the threshold: 1 is a typical strong channel of the layer, 0 a channel that never fires (the top tenth score
    above 1). `prune.activation.mode: threshold` removes every channel under a fixed fraction of that. The means
    pool every process's calibration batches (see `gather_over_processes`).
    """

    needs_features = True
    quantile = 0.9

    def __init__(self, gather: Gather | None = None) -> None:
        self.gather = gather
        self.means: dict[nn.Module, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Accumulate the per-channel mean |input| of every conv and linear layer while open."""
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def keep(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float().abs()
            flat = x.flatten(0, -2) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
            sums[module] = sums.get(module, 0) + flat.sum(dim=0)
            counts[module] = counts.get(module, 0) + flat.shape[0]

        kinds = (nn.modules.conv._ConvNd, nn.Linear)
        hooks = [m.register_forward_pre_hook(keep) for m in model.modules() if isinstance(m, kinds)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        stats = {
            m: torch.cat([total, torch.tensor([float(counts[m])], device=total.device)]) for m, total in sums.items()
        }
        self.means = {
            m: (every[:, :-1].sum(0) / every[:, -1].sum()) for m, every in _gather_all(stats, self.gather).items()
        }

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        width = len(group[0].idxs)
        parts = []
        for item in group:
            module = item.dep.target.module
            if item.dep.handler not in _CONSUMER_HANDLERS or module not in self.means:
                continue
            means = self.means[module]
            root = torch.as_tensor(list(item.root_idxs))
            total = torch.zeros(width).index_add_(0, root, means[torch.as_tensor(list(item.idxs))])
            count = torch.zeros(width).index_add_(0, root, torch.ones(len(root)))
            parts.append(total / count.clamp_min(1) / torch.quantile(means, self.quantile).clamp_min(1e-12))
        return torch.stack(parts).mean(dim=0) if parts else None


@register_importance("activation")
def activation_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean absolute input to the next layers per channel, relative to their 0.9-quantile (the AIP authors')."""
    return ActivationImportance()


@register_importance("similarity")
def similarity_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Redundancy: one of each pair of near-identical filters (or feature maps, prune.similarity.source) first."""
    return SimilarityImportance(cfg.similarity.source)


@register_importance("fpgm")
def fpgm_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Filters closest to the geometric median of their layer go first (He et al. 2019, weights only)."""
    return tp.importance.FPGMImportance(normalizer="mean")


@register_importance("hybrid")
def hybrid_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Placeholder entry so `hybrid` is a known name; the AIP method asks `criterion_for_interval` which applies."""
    raise TypeError("hybrid is a schedule of criteria: call criterion_for_interval() and create that one")


def criterion_for_interval(cfg: PruneConfig, interval: int, reached: float) -> str:
    """The criterion that interval `interval` (1-based) uses; `reached` is the fraction of the total reduction done.

    For `hybrid`: the saliency criterion until the switch (an interval index, or a fraction of the reduction
    reached), the similarity criterion from then on. Any other criterion applies to every interval.
    """
    if cfg.criterion != "hybrid":
        return cfg.criterion
    h = cfg.hybrid
    late = interval >= h.switch_interval if h.switch_interval is not None else reached >= h.switch_fraction - 1e-9
    return h.similarity if late else h.saliency


def create_importance(name: str, cfg: PruneConfig | None = None) -> tp.importance.Importance:
    """The criterion registered as `name`, configured from the `prune` section."""
    return IMPORTANCES.get(name)(cfg if cfg is not None else PruneConfig())
