"""Forward hooks that keep the outputs of named modules (stage ends) from the latest forward pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FeatureTaps:
    """Collects the outputs of `names` (module names as in `model.named_modules()`) on every forward.

    Only the latest forward's outputs are held, so nothing accumulates across steps. Hooks sit on the submodules,
    so they keep working when the model is wrapped (DDP) and after pruning (which replaces parameters, not modules).
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            known = [n for n, m in modules.items() if n and len(list(m.children())) > 0][:20]
            raise ValueError(f"model.taps: no module named {missing}; modules with children include: {known}")
        self.names = list(names)
        self._outputs: dict[str, torch.Tensor] = {}
        self._hooks = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str):
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return keep

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The tapped outputs of the latest forward, in the order of `names`."""
        return [self._outputs[n] for n in self.names if n in self._outputs]

    def clear(self) -> None:
        self._outputs.clear()

    def remove(self) -> None:
        """Detach the hooks and drop the held tensors."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
