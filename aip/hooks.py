"""Running a model for inspection: eval mode and temporary forward hooks, both undone afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

Hook = Callable[[nn.Module, Any, Any], None]


@contextlib.contextmanager
def inspecting(model: nn.Module, hooks: dict[nn.Module, Hook] | None = None) -> Iterator[nn.Module]:
    """Eval mode plus a forward hook on each given module for the duration; the mode and the hooks are undone
    on exit, also after an error, so a probe never leaves a model changed."""
    was_training = model.training
    handles = [module.register_forward_hook(hook) for module, hook in (hooks or {}).items()]
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
