"""Redundancy as a channel criterion (`prune.criterion: similarity`): one of each pair of near-identical filters or
feature maps goes first, so the output changes least (the late intervals of the hybrid criterion)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from aip.config import PruneConfig
from aip.prune.criteria.registry import register_importance


def redundancy_scores(vectors: torch.Tensor, strength: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (low = goes first) that remove one channel of each redundant pair before any distinct channel.

    `vectors` (channels, features) are compared by cosine distance. Greedily, the closest pair among the remaining
    channels gives up the member with the smaller `strength` (L2 norm by default), which leaves the others. So a
    duplicate goes first while its twin, no longer having a near neighbour, stays. Nearest neighbours are kept per
    channel and refreshed only when one goes, which keeps this near O(C^2).

    The score is the channel's place in that order over the width, (k + 1) / C: only the order within the layer
    carries meaning, so globally ranked groups lose similar fractions. Scoring by the merge distance instead (even
    divided by its mean) let narrow early layers fall to 2 of 16 channels: on the published CIFAR ResNet-20, a
    second interval from 0.707 to 0.5 of the FLOPs left 28.9% top-1 after BatchNorm recalibration (at commit
    70a6b88), against 44.1% for L1 and 44.3% for these ranks (`python benchmarks/criterion_probe.py`, 2-core CPU).
    """
    v = vectors.detach().float()
    c = v.shape[0]
    if c == 1:
        return torch.ones(1, device=vectors.device)
    strength = v.norm(dim=1) if strength is None else strength.float()
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - unit @ unit.T).clamp_min(0.0).cpu().numpy()
    np.fill_diagonal(dist, np.inf)
    power = strength.cpu().numpy()
    # the greedy loop touches a few entries per step: numpy's per-call cost is a fraction of torch's
    alive = np.ones(c, dtype=bool)
    nn_idx = dist.argmin(axis=1)
    nn_dist = dist[np.arange(c), nn_idx]
    scores = np.full(c, float(c), dtype=np.float32)  # the last survivor
    for k in range(c - 1):
        i = int(nn_dist.argmin())  # dropped channels' entries are inf
        j = int(nn_idx[i])
        drop = i if power[i] <= power[j] else j
        scores[drop] = k + 1
        alive[drop] = False
        nn_dist[drop] = np.inf
        stale = np.flatnonzero(alive & (nn_idx == drop))
        if len(stale):
            rows = np.where(alive, dist[stale], np.inf)
            nn_idx[stale] = rows.argmin(axis=1)
            nn_dist[stale] = rows[np.arange(len(stale)), nn_idx[stale]]
    return torch.from_numpy(scores / c).to(vectors.device)


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
            grid = out.detach().reshape(out.shape[0], out.shape[1], -1)  # (samples, channels, positions)
            total = grid.shape[0] * grid.shape[2]
            gen = torch.Generator().manual_seed(total)
            take = torch.randperm(total, generator=gen)[: self.max_positions].to(grid.device)
            # column n * positions + p of the (channels, samples * positions) matrix, gathered without forming it
            picked = grid[take // grid.shape[2], :, take % grid.shape[2]]
            store.setdefault(module, []).append(picked.T.float().cpu())

        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hooks = [m.register_forward_hook(keep) for m in layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self.features = {m: c[0] if len(c) == 1 else torch.cat(c, dim=1) for m, c in store.items()}

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


@register_importance("similarity")
def similarity_importance(cfg: PruneConfig) -> tp.importance.Importance:
    """Redundancy: one of each pair of near-identical filters (or feature maps, prune.similarity.source) first."""
    return SimilarityImportance(cfg.similarity.source)
