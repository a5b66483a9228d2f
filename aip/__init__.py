"""aip: structured channel pruning with adversarial knowledge distillation.

`aip.load_config(path, overrides)`, `aip.run(cfg, teacher=..., train_data=..., val_data=..., out=...)` and
`aip.load_pruned(run_dir, model=None)` are the Python API (aip/api.py); they are imported on first use, so
`import aip` alone stays light."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_config", "load_pruned", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aip import api

        return getattr(api, name)
    raise AttributeError(f"module 'aip' has no attribute {name!r}")
