"""Channel criteria as Torch-Pruning Importance objects, filed in a registry by their config name.

Each entry is a factory taking the `prune` config and returning a `tp.importance.Importance`: called on a dependency
group, it gives one score per channel of the group's root (higher = keep). Scores are normalised per group (mean 1)
so that a global ranking across groups compares like with like. Criteria that read gradients set `needs_gradients`
(the caller fills `.grad` from calibration batches first); criteria that read feature maps set `needs_features` and
record them with `recording(model)` while the caller runs calibration batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn

from aip.config import PruneConfig
from aip.registry import Registry

IMPORTANCES = Registry("criterion")
register_importance = IMPORTANCES.register


def needs_gradients(importance: tp.importance.Importance) -> bool:
    """True when the criterion reads `.grad` of the weights (the caller must run calibration backward passes)."""
    return bool(getattr(importance, "needs_gradients", False))


def needs_features(importance: tp.importance.Importance) -> bool:
    """True when the criterion reads feature maps recorded on calibration batches."""
    return bool(getattr(importance, "needs_features", False))


@register_importance("l1")
def l1_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean L1 norm of each channel's weights over all coupled layers of the group."""
    return tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean")


@register_importance("l2")
def l2_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean L2 norm of each channel's weights over all coupled layers of the group."""
    return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")


@register_importance("bn_scale")
def bn_scale_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """|gamma| of the BatchNorm layers that follow the channel (network slimming)."""
    return tp.importance.BNScaleImportance(normalizer="mean")


class _TaylorImportance(tp.importance.GroupTaylorImportance):
    needs_gradients = True


@register_importance("taylor")
def taylor_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """First-order Taylor estimate |w * dL/dw| of the loss change when a channel goes (Molchanov et al. 2019)."""
    return _TaylorImportance(normalizer="mean")


def redundancy_scores(vectors: torch.Tensor, strength: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (low = goes first) that remove one channel of each redundant pair before any distinct channel.

    `vectors` (channels, features) are compared by cosine distance. Greedily, the closest pair among the remaining
    channels gives up the member with the smaller `strength` (L2 norm by default), which leaves the others;
    its score is the distance at which it went (made non-decreasing). So a duplicate goes first while its twin,
    no longer having a near neighbour, stays. Nearest neighbours are kept per channel and refreshed only when one
    goes, which keeps this near O(C^2).
    """
    v = vectors.detach().float()
    c = v.shape[0]
    if c == 1:
        return torch.ones(1)
    strength = v.norm(dim=1) if strength is None else strength.float()
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    dist.fill_diagonal_(float("inf"))
    alive = torch.ones(c, dtype=torch.bool)
    nn_dist, nn_idx = dist.min(dim=1)
    scores = torch.zeros(c)
    level = 0.0
    for _ in range(c - 1):
        i = int(torch.where(alive, nn_dist, torch.inf).argmin())
        j = int(nn_idx[i])
        drop = i if strength[i] <= strength[j] else j
        level = max(level, float(nn_dist[i]))
        scores[drop] = level
        alive[drop] = False
        dist[:, drop] = float("inf")
        stale = (alive & (nn_idx == drop)).nonzero().flatten()
        if len(stale):
            nn_dist[stale], nn_idx[stale] = dist[stale].min(dim=1)
    scores[alive] = 2.0 * level if level > 0 else 1.0
    return scores / scores.mean().clamp_min(1e-12)


class SimilarityImportance(tp.importance.Importance):
    """Redundant channels first: nearly identical filters (all coupled output layers) or feature maps."""

    def __init__(self, source: str = "weights", max_positions: int = 4096) -> None:
        self.source = source
        self.needs_features = source == "features"
        self.max_positions = max_positions
        self.features: dict[nn.Module, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Record each conv/linear layer's output channels (as vectors over samples and positions) while open."""
        self.features = {}
        store: dict[nn.Module, list[torch.Tensor]] = {}

        def keep(module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            flat = out.detach().float().transpose(0, 1).flatten(1)  # (channels, samples * positions)
            gen = torch.Generator().manual_seed(flat.shape[1])
            take = torch.randperm(flat.shape[1], generator=gen)[: self.max_positions].to(flat.device)
            store.setdefault(module, []).append(flat[:, take].cpu())

        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hooks = [m.register_forward_hook(keep) for m in layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self.features = {m: torch.cat(chunks, dim=1) for m, chunks in store.items()}

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        root = group[0].dep.target.module
        if self.source == "features":
            if root not in self.features:
                return None
            return redundancy_scores(self.features[root])
        width = len(group[0].idxs)
        parts = []
        for item in group:
            layer, idxs = item.dep.target.module, item.idxs
            if item.dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels) and len(idxs) == width:
                w = layer.weight.transpose(0, 1) if getattr(layer, "transposed", False) else layer.weight
                rows = torch.empty(width, w[0].numel(), device=w.device)
                rows[torch.as_tensor(list(item.root_idxs), device=w.device)] = w[idxs].flatten(1).float()
                parts.append(rows)
        if not parts:
            return None
        return redundancy_scores(torch.cat(parts, dim=1))


class ActivationImportance(tp.importance.Importance):
    """Mean absolute activation of each channel on calibration batches, divided by its layer's maximum (in [0, 1]).

    The AIP authors' criterion: a channel that hardly ever fires carries little. Each coupled layer of the group
    counts: its BatchNorm outputs where the group has BatchNorms (activations on a common scale), else its
    conv/linear outputs; the group's score per channel is the mean over those layers. Scores lie in [0, 1], so
    `prune.activation.mode: threshold` can remove every channel under a fixed fraction of its layer's strongest.
    """

    needs_features = True

    def __init__(self) -> None:
        self.means: dict[nn.Module, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Accumulate per-channel mean |output| of every conv, linear and BatchNorm layer while open."""
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def keep(module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            flat = out.detach().float().abs().transpose(0, 1).flatten(1)  # (channels, samples * positions)
            sums[module] = sums.get(module, 0) + flat.sum(dim=1).cpu()
            counts[module] = counts.get(module, 0) + flat.shape[1]

        kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
        hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, kinds)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self.means = {m: total / counts[m] for m, total in sums.items()}

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        width = len(group[0].idxs)
        out_handlers = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels)
        layers = [
            item
            for item in group
            if item.dep.handler in out_handlers and item.dep.target.module in self.means and len(item.idxs) == width
        ]
        norms = [item for item in layers if item.dep.handler == tp.prune_batchnorm_out_channels]
        parts = []
        for item in norms or layers:
            means = self.means[item.dep.target.module]
            score = torch.empty(width)
            score[torch.as_tensor(list(item.root_idxs))] = means[torch.as_tensor(list(item.idxs))]
            parts.append(score / means.max().clamp_min(1e-12))
        return torch.stack(parts).mean(dim=0) if parts else None


@register_importance("activation")
def activation_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Mean absolute activation per channel, relative to its layer's maximum (the AIP authors' criterion)."""
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
    """Placeholder entry so `hybrid` is a known name; the engine asks `criterion_for_interval` which one applies."""
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
