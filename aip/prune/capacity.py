"""Effective filter analysis: how many channels of a layer carry independent information, hence how far to prune it.

Rule (our concrete reading of the idea; the paper's exact rule is not available): for a layer with C output
channels, collect the per-sample gradient of the loss with respect to the layer's output, averaged over space, as a
matrix G of shape (samples, C). Its singular values s give the effective rank r: the fewest leading singular values
whose energy sum(s_i^2) reaches a fraction `tau` (default 0.99) of the total. Directions beyond r barely move the
loss, so up to C - r channels are redundant: the maximum prunable ratio is (1 - r / C) * `safety` (default 0.9).
The model runs in eval mode while gradients are collected, so BatchNorm does not couple samples and each row of G
belongs to one sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from aip.hooks import inspecting


@dataclass
class LayerCapacity:
    name: str
    width: int
    effective_rank: int
    max_ratio: float

    @property
    def redundancy(self) -> float:
        """Effective rank over width: the lower, the more redundant the layer (hierarchical pruning starts there)."""
        return self.effective_rank / self.width


def effective_rank(singular_values: torch.Tensor, tau: float = 0.99) -> int:
    """The fewest leading singular values whose squared sum reaches `tau` of the total energy (at least 1)."""
    energy = singular_values.double().pow(2)
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = energy.cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(tau, dtype=cumulative.dtype) - 1e-12).item()) + 1


def capacity_from_gradients(name: str, grads: torch.Tensor, tau: float = 0.99, safety: float = 0.9) -> LayerCapacity:
    """The capacity of one layer from its (samples, channels) output-gradient matrix."""
    width = grads.shape[1]
    rank = min(effective_rank(torch.linalg.svdvals(grads.double()), tau), width)
    return LayerCapacity(name, width, rank, max(0.0, (1.0 - rank / width) * safety))


def _per_channel(grad: torch.Tensor) -> torch.Tensor:
    """(samples, channels): a conv output's gradient averaged over space; a linear output's as it is."""
    grad = grad.detach().float()
    return (grad.flatten(2).mean(2) if grad.dim() > 2 else grad).cpu()


def estimate_capacity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    run_batches: Callable[[nn.Module], None],
    tau: float = 0.99,
    safety: float = 0.9,
) -> dict[str, LayerCapacity]:
    """Capacity of each named layer; `run_batches(model)` must run calibration forward and backward passes."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def tap(name: str):
        def on_forward(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: grads[name].append(_per_channel(g)))

        return on_forward

    try:
        with inspecting(model, {module: tap(name) for name, module in layers.items()}):
            run_batches(model)
    finally:
        model.zero_grad(set_to_none=True)
    missing = [n for n, g in grads.items() if not g]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:5]}: run_batches must call backward")
    return {n: capacity_from_gradients(n, torch.cat(g), tau, safety) for n, g in grads.items()}
