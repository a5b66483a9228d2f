"""Your own model class: `model.name: package.module:callable`, built as `callable(**model.kwargs)`.

The module is imported from the working directory or the Python path (the working directory is added while
importing, since `python aip/train.py` does not put it on sys.path). Every failure a user can hit, from the import to
an output of the wrong width, is a one-line ConfigError naming model.name.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from aip.config import ConfigError

BUILT_INS = ("torchvision", "timm")
# Arguments filled from the data when the callable names them and model.kwargs leaves them out.
DATA_ARGUMENTS = ("num_classes", "in_channels")


def is_import_path(name: str) -> bool:
    """True for `package.module:callable`, as opposed to a registered name or `torchvision:` / `timm:`."""
    return ":" in name and name.split(":", 1)[0] not in BUILT_INS


def given_name(model: nn.Module) -> str:
    """`module:qualname` of a model's class: how a run names a model that was given to it as an object."""
    return f"{type(model).__module__}:{type(model).__qualname__}"


def given_copy(model: nn.Module | None, given: str | None) -> nn.Module | None:
    """A CPU copy of `model`, the unpruned model to rebuild a run's pruned one on (None: build the configured one).
    A run that pruned a model given as an object (`given`: its class, which no config names) needs it again."""
    if model is not None:
        return copy.deepcopy(model).cpu()
    if given:
        raise ConfigError(
            f"load_pruned: this run pruned a model given to aip.run as an object ({given}), which no config names; "
            "pass the unpruned model: aip.load_pruned(path, model=...)"
        )
    return None


def _short(exc: BaseException) -> str:
    """`Type: message` on one line, for an error message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import(module: str) -> Any:
    """Import `module` with the working directory on sys.path for the duration (where it is not already)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve(name: str) -> Callable[..., Any]:
    """The callable that `package.module:callable` (the attribute may be dotted) names; imports the module."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ConfigError(f"model.name: {name!r} is not of the form package.module:callable")
    try:
        obj = _import(module)
    except Exception as exc:  # a user module may fail in any way while importing
        raise ConfigError(
            f"model.name: cannot import {module!r} for {name!r} ({_short(exc)}); it must be importable from the "
            "working directory or the Python path"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.name: {name!r}: {getattr(obj, '__name__', module)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.name: {name!r} is a {type(obj).__name__}, not a class or function")
    return obj


def _accepts(fn: Callable[..., Any]) -> set[str]:
    """The keyword arguments `fn` names explicitly (a `**kwargs` catch-all does not count)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some built-in callables have no signature
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}


@torch.no_grad()
def _check_output(model: nn.Module, name: str, example: torch.Tensor, num_classes: int) -> None:
    """One forward in eval mode on the data's example shape: the output must be (1, num_classes) logits."""
    was_training = model.training
    model.eval()
    try:
        out = model(example)
    except Exception as exc:  # the user's forward may fail in any way on the data's shape
        raise ConfigError(
            f"model.name: {name!r} fails on one input of the data's shape {tuple(example.shape[1:])} ({_short(exc)})"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"model.name: {name!r} returns a {type(out).__name__}; it must return a tensor of logits (N, classes)"
        )
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ConfigError(
            f"model.name: {name!r} outputs shape {tuple(out.shape)} for one image, but the data has {num_classes} "
            "classes; give the width in model.kwargs or take a num_classes argument"
        )


def build_user_model(
    name: str,
    kwargs: dict[str, Any],
    num_classes: int,
    in_channels: int = 3,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """`callable(**kwargs)`, plus num_classes / in_channels when it names them and kwargs does not set them.

    With `example` (one input of the data's shape), a probe forward checks the output width against num_classes.
    """
    fn = resolve(name)
    given = dict(kwargs)
    known = _accepts(fn)
    from_data = {"num_classes": num_classes, "in_channels": in_channels}
    for key in DATA_ARGUMENTS:
        if key in known and key not in given:
            given[key] = from_data[key]
    try:
        model = fn(**given)
    except Exception as exc:  # the user's constructor may fail in any way
        raise ConfigError(f"model.name: {name}(**{given}) raised {_short(exc)}") from None
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise ConfigError(f"model.name: {name!r} returned an object of type {kind}, not a torch.nn.Module")
    if example is not None:
        _check_output(model, name, example, num_classes)
    return model
