"""Model registry: CIFAR ResNets, VGG-16-BN, any torchvision or timm model by name and your own class by import
path (`package.module:callable`, aip/models/user.py), with the helpers the trainer needs (stage-end taps for attention
transfer, the classifier that pruning must not shrink)."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from aip.errors import ConfigError
from aip.hooks import inspecting
from aip.models import cifar_resnet, toy_graphs, vgg  # noqa: F401  (fill the registry)
from aip.models.heads import classifier_of
from aip.models.pretrained import build_pretrained, check_pretrained
from aip.models.registry import MODELS, register_model
from aip.models.user import build_user_model, is_import_path, resolve
from aip.models.vgg import VGG
from aip.registry import UnknownNameError
from aip.schema import ModelConfig

__all__ = ["MODELS", "register_model", "create_model", "check_model_name", "default_taps", "classifier_of"]

MAX_TAPS = 4


def _suggest(name: str, known: list[str]) -> str:
    """The known names closest to `name`, for an error message."""
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.5)
    return ", ".join(close) if close else f"e.g. {', '.join(known[:8])}"


def check_model_name(name: str) -> None:
    """Raise UnknownNameError when no model of that name can be built; builds nothing.

    For `package.module:callable` the module is imported and the callable looked up (a ConfigError if that fails).
    """
    if is_import_path(name):
        resolve(name)
    elif name.startswith("torchvision:"):
        import torchvision

        known = torchvision.models.list_models()
        if name.split(":", 1)[1] not in known:
            raise UnknownNameError(
                f"unknown torchvision model {name!r}; close names: {_suggest(name.split(':', 1)[1], known)} "
                "(all: torchvision.models.list_models())"
            )
    elif name.startswith("timm:"):
        import timm

        bare = name.split(":", 1)[1]
        if not timm.is_model(bare):
            raise UnknownNameError(
                f"unknown timm model {name!r}; close names: {_suggest(bare, timm.list_models())} "
                "(all: timm.list_models())"
            )
    else:
        MODELS.get(name)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    kwargs: dict[str, Any] | None = None,
    example: torch.Tensor | None = None,
    pretrained: bool = False,
    pretrained_file: str | None = None,
) -> nn.Module:
    """A fresh, randomly initialised model: a registered name, `torchvision:<name>`, `timm:<name>`, or
    `package.module:callable` called with `kwargs` (its output width checked on `example`, one input of the data).

    `pretrained` (or a `pretrained_file`): a timm or torchvision model with its library's weights instead, the
    classifier replaced when `num_classes` differs (aip/models/pretrained.py); `kwargs` may name torchvision weights.
    """
    if is_import_path(name):
        return build_user_model(name, kwargs or {}, num_classes, in_channels, example)
    check_model_name(name)
    if name.startswith("torchvision:") and in_channels != 3:
        raise ConfigError(
            f"model.name: {name} takes 3 input channels but the data has {in_channels}; use a registered model "
            "or a timm: one (they take any channel count)"
        )
    if pretrained or pretrained_file is not None:
        spec = ModelConfig(name=name, kwargs=dict(kwargs or {}), pretrained=True, pretrained_file=pretrained_file)
        check_pretrained(spec)
        return build_pretrained(spec, num_classes, in_channels)
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=num_classes, in_chans=in_channels)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def _probe_examples(model: nn.Module) -> list[torch.Tensor]:
    """Inputs to try for a shape probe: the model's own input size if timm states one, else 128, then 224 pixels."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    sizes = [128, 224]
    stated = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if stated and len(stated) == 3:
        sizes.insert(0, int(stated[-1]))
    return [torch.randn(1, channels, s, s, device=device, dtype=dtype) for s in dict.fromkeys(sizes)]


@torch.no_grad()
def _output_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every tensor-returning submodule, in the order they finish, on one probe.

    Eval mode and the hooks are undone afterwards. Empty when no probe input fits the model.
    """
    for example in _probe_examples(model):
        shapes: list[tuple[str, tuple[int, ...]]] = []

        def keep(name: str, shapes: list[tuple[str, tuple[int, ...]]] = shapes):
            def hook(_m: nn.Module, _i: object, out: object) -> None:
                if isinstance(out, torch.Tensor):
                    shapes.append((name, tuple(out.shape)))

            return hook

        modules = {m: keep(n) for n, m in model.named_modules() if n}
        try:
            with inspecting(model, modules):
                model(example)
        except (RuntimeError, ValueError, AssertionError, TypeError):
            continue  # a fixed input size or channel count the probe missed; try the next size
        return shapes
    return []


def _stage_ends(shapes: list[tuple[str, tuple[int, ...]]], depth: int, head: str) -> list[str]:
    """Among modules nested `depth` deep, the last one at each spatial size of an (N, C, H, W) output.

    Stops at the classifier head (module `head`, inside it or around it), and at the first output that is 1x1 or
    larger than the one before (global pooling).
    """
    ends: list[tuple[str, int]] = []
    for name, shape in shapes:
        if name.count(".") != depth - 1:
            continue
        if name == head or name.startswith(f"{head}.") or head.startswith(f"{name}."):
            break
        if len(shape) != 4 or shape[-1] != shape[-2]:
            continue  # not an (N, C, H, W) map of the square probe: tokens, or channels-last (N, H, W, C)
        size = shape[-2]
        if size <= 1 or (ends and size > ends[-1][1]):
            break
        if ends and ends[-1][1] == size:
            ends[-1] = (name, size)
        else:
            ends.append((name, size))
    return [name for name, _ in ends]


def _timm_taps(name: str, info: list[dict], shapes: list[tuple[str, tuple[int, ...]]]) -> list[str]:
    """timm's `feature_info`: the last module at each stated reduction, checked to give (N, C, H, W) outputs."""
    last = {d.get("reduction", i): d for i, d in enumerate(info)}
    picked = list(last.values())[-MAX_TAPS:]
    seen = dict(shapes)
    for d in picked:
        shape = seen.get(d["module"])
        if shape is None or len(shape) != 4 or ("num_chs" in d and shape[1] != d["num_chs"]):
            # Transformer tokens (N, L, C) or channels-last stages (N, H, W, C): attention maps need (N, C, H, W).
            raise ValueError(
                f"cannot use the stages of {name!r} for attention transfer: {d['module']!r} gives "
                f"{'no output' if shape is None else tuple(shape)}, not (N, {d.get('num_chs', 'C')}, H, W); set "
                "model.taps to module names whose outputs are (N, C, H, W) maps"
            )
    if len(picked) < 2:
        raise ValueError(
            f"cannot find two stages of {name!r} at different resolutions (timm lists {[d['module'] for d in info]}); "
            "set model.taps to module names whose outputs are (N, C, H, W) maps"
        )
    return [d["module"] for d in picked]


def default_taps(model: nn.Module, name: str) -> list[str]:
    """Names of the modules that end each stage of the network (at most the last four), for attention transfer.

    CIFAR, torchvision and timm ResNets: layer1..layer3 (layer4); our VGG: the last ReLU before each pool from the
    second stage on; timm models: their `feature_info`, one module per reduction; anything else: found by a probe
    forward, the last module at each resolution before the classifier head among the children (or grandchildren,
    ... when the children are a few big blocks). Raises ValueError, asking for `model.taps`, when no two stages with
    (N, C, H, W) outputs are found (vision transformers, channels-last stages).
    """
    children = dict(model.named_children())
    if all(f"layer{i}" in children for i in (1, 2, 3)):
        return [f"layer{i}" for i in (1, 2, 3, 4) if f"layer{i}" in children]
    if isinstance(model, VGG):
        feats = list(model.features.named_children())
        ends = [f"features.{feats[i - 1][0]}" for i, (_, m) in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        return ends[1:]
    shapes = _output_shapes(model)
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(d, dict) and "module" in d for d in info):
        return _timm_taps(name, info, shapes)
    names = {m: n for n, m in model.named_modules()}
    head = names[classifier_of(model)]
    first_conv = next((n for m, n in names.items() if isinstance(m, nn.Conv2d)), "")
    parent = head.rsplit(".", 1)[0] if "." in head else ""
    if parent and not first_conv.startswith(f"{parent}."):
        head = parent  # a separate head container (dropout, pooling, classifier): no tap inside it
    best: list[str] = []
    deepest = max((n.count(".") + 1 for n, _ in shapes), default=0)
    for depth in range(1, min(deepest, 4) + 1):
        ends = _stage_ends(shapes, depth, head)
        if len(ends) > len(best):
            best = ends
        if len(best) >= 3:
            break
    if len(best) < 2:
        example = best or list(children)[:3]
        raise ValueError(
            f"cannot find the stages of {name!r} (attention transfer needs (N, C, H, W) outputs at falling "
            f"resolutions): set model.taps to module names, e.g. {example}"
        )
    return best[-MAX_TAPS:]
