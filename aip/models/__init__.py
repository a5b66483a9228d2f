"""Model registry: CIFAR ResNets, VGG-16-BN, and any torchvision or timm model by name, with the helpers the
trainer needs (stage-end taps for attention transfer, the classifier that pruning must not shrink)."""

from __future__ import annotations

import torch
from torch import nn

from aip.models import cifar_resnet, vgg  # noqa: F401  (fill the registry)
from aip.models.registry import MODELS, register_model
from aip.registry import UnknownNameError

__all__ = ["MODELS", "register_model", "create_model", "check_model_name", "default_taps", "classifier_of"]


def check_model_name(name: str) -> None:
    """Raise UnknownNameError when no model of that name can be built; builds nothing."""
    if name.startswith("torchvision:"):
        import torchvision

        known = torchvision.models.list_models()
        if name.split(":", 1)[1] not in known:
            raise UnknownNameError(
                f"unknown torchvision model {name!r}; torchvision knows e.g. {', '.join(known[:12])}"
            )
    elif name.startswith("timm:"):
        import timm

        if not timm.is_model(name.split(":", 1)[1]):
            close = timm.list_models(f"*{name.split(':', 1)[1][:6]}*")[:10]
            raise UnknownNameError(f"unknown timm model {name!r}; similar timm names: {', '.join(close) or 'none'}")
    else:
        MODELS.get(name)


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A fresh, randomly initialised model: a registered name, `torchvision:<name>` or `timm:<name>`."""
    check_model_name(name)
    if name.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)
        if in_channels != 3:
            raise UnknownNameError(f"{name}: torchvision models take 3 input channels, the data has {in_channels}")
        return model
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=num_classes, in_chans=in_channels)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


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


@torch.no_grad()
def _stage_ends(model: nn.Module, example: torch.Tensor, depth: int) -> list[str]:
    """Modules at nesting `depth` after which the spatial size falls: the last module of each resolution."""
    sizes: list[tuple[str, tuple[int, int]]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name or name.count(".") != depth - 1:
            continue

        def keep(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                sizes.append((name, tuple(out.shape[-2:])))

        hooks.append(module.register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    ends = [name for (name, size), (_, nxt) in zip(sizes, sizes[1:], strict=False) if nxt[0] < size[0]]
    if sizes:
        ends.append(sizes[-1][0])
    return ends


def default_taps(model: nn.Module, name: str, example: torch.Tensor | None = None) -> list[str]:
    """Names of the modules that end each stage of the network, for attention transfer.

    CIFAR ResNets: layer1..layer3; torchvision ResNets: layer1..layer4; VGG: the last ReLU before each pool from the
    second stage on; timm models: their `feature_info`; anything else: the last module at each resolution (children,
    or grandchildren when the children are one big block).
    """
    children = dict(model.named_children())
    if all(f"layer{i}" in children for i in (1, 2, 3)):
        return [f"layer{i}" for i in (1, 2, 3, 4) if f"layer{i}" in children]
    if name == "vgg16_bn":
        feats = list(model.features.named_children())
        ends = [f"features.{feats[i - 1][0]}" for i, (_, m) in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        return ends[1:]
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(d, dict) and "module" in d for d in info):
        return [d["module"] for d in info][1:]  # timm: one entry per stage, at strides 2..32
    if example is None:
        example = torch.randn(1, 3, 64, 64)
    ends = _stage_ends(model, example, 1)
    if len(ends) < 2:
        ends = _stage_ends(model, example, 2)
    if not ends:
        raise ValueError(f"cannot find the stages of {name!r}: set model.taps to module names, e.g. ['layer2']")
    return ends[-4:]
