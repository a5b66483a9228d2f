"""The modes a run can be, in a registry as models, data sets and criteria are: `cfg.mode` -> the function that runs
it, `(session, resume, branch) -> Outcome`. Each entry imports its module on first use, so this registry is cheap
to import (the config checks list its names) and a classification run never loads what another mode needs.

A new mode: a module under aip/methods/ with its run function, and one line in `_ENTRIES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from aip.registry import Registry

MODES = Registry("mode")
register_mode = MODES.register

# mode -> (module, function); the function takes (session, resume=None, branch=None).
_ENTRIES = {
    "aip": ("aip.methods.aip", "run_aip"),
    "acp": ("aip.methods.acp", "run_acp"),
    "train": ("aip.methods.train", "run_train"),
    "eval": ("aip.methods.evaluate", "run_eval"),
}


def _lazy(module: str, function: str) -> Callable[..., Any]:
    """A factory that imports `module` and hands back its `function`."""

    def load() -> Callable[..., Any]:
        return getattr(importlib.import_module(module), function)

    load.__doc__ = f"{module}.{function}"
    return load


for _name, (_module, _function) in _ENTRIES.items():
    register_mode(_name)(_lazy(_module, _function))
