"""The classifier of a network: what pruning must not shrink and what a pretrained model's new head replaces."""

from __future__ import annotations

from torch import nn


def classifier_of(model: nn.Module) -> nn.Module:
    """The final classification layer (the last Linear, else the last Conv2d): its outputs are never pruned."""
    if hasattr(model, "get_classifier") and isinstance(model.get_classifier(), nn.Module):  # timm
        head = model.get_classifier()
        if any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in head.modules()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no Linear or Conv2d layer to serve as classifier")
    return convs[-1]
