"""Pretrained `timm:` and `torchvision:` models (`model.pretrained`, `model.pretrained_file`): the library's own
weights (from its cache, downloaded there when online) or a local file loaded as the library loads its own, the
classifier replaced when the data has another class count, and the preprocessing the weights were trained with.

Offline with nothing cached is one ConfigError line naming the file to place and where; so is a file that does not fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import torch
from torch import nn

from aip.errors import ConfigError
from aip.models.heads import classifier_of
from aip.schema import Config, DataConfig, ModelConfig

# What a failed download or a weights file that does not fit raises inside timm, torchvision and huggingface_hub.
_LOAD_ERRORS = (OSError, RuntimeError, KeyError, ValueError, AssertionError)


def wants_pretrained(m: ModelConfig) -> bool:
    """Whether the model starts from pretrained weights (a pretrained file implies it)."""
    return m.pretrained or m.pretrained_file is not None


def architecture_only(cfg: Config) -> Config:
    """`cfg` with the pretrained weights off (a torchvision weights name dropped): the same architecture, built
    without fetching weights that a checkpoint then replaces (a resume or a load works offline)."""
    m = cfg.model
    if not wants_pretrained(m):
        return cfg
    kwargs = {k: v for k, v in (m.kwargs or {}).items() if k != "weights"}
    model = dataclasses.replace(m, pretrained=False, pretrained_file=None, kwargs=kwargs)
    return dataclasses.replace(cfg, model=model)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _bare(name: str) -> str:
    return name.split(":", 1)[1]


def check_pretrained(m: ModelConfig) -> None:
    """Up front, nothing built: `model.kwargs` only as `{weights: <name>}` of a pretrained torchvision model, naming
    weights that exist; a timm model must have a pretrained config."""
    if m.kwargs and (set(m.kwargs) != {"weights"} or not m.name.startswith("torchvision:")):
        raise ConfigError(
            f"model.kwargs: only used with model.name: package.module:callable, or as {{weights: <name>}} of a "
            f"pretrained torchvision: model; not with {m.name!r}; set it to {{}}"
        )
    if m.kwargs and not wants_pretrained(m):
        raise ConfigError(
            f"model.kwargs.weights: names torchvision weights ({m.kwargs['weights']!r}), which only "
            "model.pretrained: true loads; set model.pretrained: true or model.kwargs: {}"
        )
    if not wants_pretrained(m):
        return
    if m.name.startswith("torchvision:"):
        torchvision_weights(m)
    else:
        timm_cfg(m.name)


def torchvision_weights(m: ModelConfig) -> Any:
    """The torchvision weights enum member `model.kwargs.weights` names (DEFAULT when it names none)."""
    import torchvision

    bare = _bare(m.name)
    try:
        enum = torchvision.models.get_model_weights(bare)
    except (ValueError, KeyError):
        raise ConfigError(f"model.pretrained: torchvision has no pretrained weights for {m.name!r}") from None
    wanted = str(m.kwargs.get("weights", "DEFAULT"))
    short = wanted.rsplit(".", 1)[-1]  # "ResNet18_Weights.IMAGENET1K_V1" names the same member
    if short not in enum.__members__:
        raise ConfigError(
            f"model.kwargs.weights: {m.name} has no weights {wanted!r}; choose one of: {', '.join(enum.__members__)}"
        )
    return enum[short]


def timm_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of the model (its default tag unless the name gives one)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(_bare(name))
    if cfg is None:
        raise ConfigError(f"model.pretrained: timm has no pretrained config for {name!r}")
    return cfg.to_dict()


def pretrained_classes(m: ModelConfig) -> int:
    """The class count of the pretrained head: the file's (`model.pretrained_file`), else the library weights'."""
    if m.pretrained_file is not None:
        found = _file_classes(m.name, m.pretrained_file, os.stat(m.pretrained_file).st_mtime_ns)
        if found is not None:
            return found
    if m.name.startswith("torchvision:"):
        return len(torchvision_weights(m).meta["categories"])
    return int(timm_cfg(m.name).get("num_classes") or 0)


@functools.lru_cache(maxsize=4)
def _file_classes(name: str, path: str, mtime: int) -> int | None:
    """The output count of the classifier stored in a weights file (None when the file has no such key)."""
    if name.startswith("torchvision:"):
        state = _torchvision_state(path)
        with torch.device("meta"):
            head = _head_name(_torchvision_model(name, 1000))
    else:
        from timm.models import load_state_dict

        try:
            state = load_state_dict(path)
        except _LOAD_ERRORS as exc:
            raise ConfigError(f"model.pretrained_file: {path!r} cannot be read ({_one_line(exc)})") from None
        head = timm_cfg(name).get("classifier") or ""
        head = head[0] if isinstance(head, (list, tuple)) else head
    weight = state.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None else None


def _torchvision_state(path: str) -> dict[str, torch.Tensor]:
    from aip.models.weights import load_state_dict_file

    return load_state_dict_file(path, label="model.pretrained_file")


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(_bare(name), weights=None, num_classes=num_classes)


def head_note(m: ModelConfig, num_classes: int) -> str | None:
    """The log line when the pretrained head is replaced by one of the data's class count; None when it fits."""
    classes = pretrained_classes(m)
    if classes == num_classes:
        return None
    return f"model: {m.name} pretrained head has {classes} classes; replaced by a new {num_classes}-class head"


def build_pretrained(m: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The model with its pretrained weights, from the library's cache or `model.pretrained_file`."""
    if m.name.startswith("torchvision:"):
        return _torchvision(m, num_classes)
    return _timm(m, num_classes, in_channels)


def _timm(m: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """timm loads the weights and adapts the classifier and the first convolution itself."""
    import timm

    overlay = None
    if m.pretrained_file is not None:  # the file's own head size: timm replaces the head only when it differs
        overlay = {"file": str(m.pretrained_file), "num_classes": pretrained_classes(m)}
    try:
        return timm.create_model(
            _bare(m.name),
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=num_classes,
            in_chans=in_channels,
        )
    except _LOAD_ERRORS as exc:
        if m.pretrained_file is not None:
            raise ConfigError(
                f"model.pretrained_file: {m.pretrained_file!r} does not load into {m.name} ({_one_line(exc)})"
            ) from None
        raise ConfigError(_timm_offline(m.name, exc)) from None


def _timm_offline(name: str, exc: BaseException) -> str:
    """Where timm's weights come from, for the error when they cannot be fetched."""
    from huggingface_hub import constants

    cfg = timm_cfg(name)
    sources = [f"hf hub {cfg['hf_hub_id']}"] if cfg.get("hf_hub_id") else []
    sources += [f"url {cfg['url']}"] if cfg.get("url") else []
    return (
        f"model.pretrained: {name}'s weights are not cached and cannot be downloaded ({_one_line(exc)[:120]}); "
        f"fetch {' or '.join(sources) or 'them'} into the Hugging Face cache {constants.HF_HUB_CACHE} once online, "
        "or download the weights file and give it as model.pretrained_file"
    )


def _torchvision(m: ModelConfig, num_classes: int) -> nn.Module:
    """Built with the weights' own head, loaded, then the classifier replaced when the class count differs."""
    weights = torchvision_weights(m)
    if m.pretrained_file is None:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except _LOAD_ERRORS as exc:
            target = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
            raise ConfigError(
                f"model.pretrained: {m.name}'s weights {weights} are not cached and cannot be downloaded "
                f"({_one_line(exc)[:120]}); place {weights.url} at {target}, or give the file as model.pretrained_file"
            ) from None
        what = f"torchvision weights {weights}"
    else:
        state = _torchvision_state(m.pretrained_file)
        what = f"model.pretrained_file {m.pretrained_file!r} ({m.name})"
    model = _torchvision_model(m.name, pretrained_classes(m))  # a file's head may have been fine-tuned to others
    from aip.models.weights import load_into

    load_into(model, state, what)
    replace_head(model, num_classes)
    return model


def _head_name(model: nn.Module) -> str:
    head = classifier_of(model)
    return next(name for name, module in model.named_modules() if module is head)


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the final Linear (or 1x1 Conv2d) classifier for a fresh one of `num_classes` outputs, when it differs."""
    name = _head_name(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        if old.out_features == num_classes:
            return
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        if old.out_channels == num_classes:
            return
        bias = old.bias is not None
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=bias)
    else:
        raise ConfigError(f"model.pretrained: cannot replace the classifier {name!r} ({type(old).__name__})")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _source(cfg: Config) -> dict[str, Any]:
    """mean, std, size (the crop) and resize (the eval resize) the pretrained weights were trained with."""
    m = cfg.model
    if m.name.startswith("torchvision:"):
        t = torchvision_weights(m).transforms()
        return {"mean": tuple(t.mean), "std": tuple(t.std), "size": t.crop_size[0], "resize": t.resize_size[0]}
    from timm.data import resolve_data_config

    d = resolve_data_config(pretrained_cfg=timm_cfg(m.name))
    size = int(d["input_size"][-1])
    return {"mean": d["mean"], "std": d["std"], "size": size, "resize": math.floor(size / d["crop_pct"])}


def pretrained_data(cfg: Config, takes: tuple[str, ...]) -> tuple[DataConfig, str | None]:
    """`cfg.data` with the pretrained weights' normalisation, input size and eval resize where the config leaves them
    unset (data.image_size at its 32 default counts as unset), among what the data set `takes`; the line to log."""
    if not wants_pretrained(cfg.model) or cfg.task != "classification":
        return cfg.data, None
    src, d = _source(cfg), cfg.data
    fields = {
        "mean": ("mean", d.mean),
        "std": ("std", d.std),
        "size": ("image_size", None if d.image_size == 32 else d.image_size),
        "resize": ("eval_resize", d.eval_resize),
    }
    used, kept, skipped, changes = [], [], [], {}
    for key, (field, value) in fields.items():
        if value is not None:
            kept.append(f"data.{field}")
        elif key not in takes:
            skipped.append(key)
        else:
            if key == "resize":  # the weights' resize-to-crop ratio, on the crop this run uses
                src[key] = round(changes.get("image_size", d.image_size) * src["resize"] / src["size"])
            changes[field] = list(src[key]) if key in ("mean", "std") else src[key]
            used.append(f"{key} {src[key]}")
    parts = [f"data: from the pretrained {cfg.model.name}: {', '.join(used) or 'nothing'}"]
    if kept:
        parts.append(f"set in the config: {', '.join(kept)}")
    if skipped:
        parts.append(f"not applicable to {d.name} data: {', '.join(skipped)}")
    return dataclasses.replace(d, **changes), "; ".join(parts)
