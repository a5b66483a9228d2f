"""`train.compile`: the model being trained runs under torch.compile, compiled afresh for each architecture.

The model is compiled in place (`nn.Module.compile`): no wrapper module, so its state-dict keys, what checkpoints
and exports hold, stay those of the plain model (no `_orig_mod.`). Pruning gives the student new Parameters and
shapes, so every compilation starts from an empty cache (no graph traced for an earlier architecture serves it), and
the compiled call is removed again when training ends, before the model is pruned, copied, saved or exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def compile_in_place(model: nn.Module) -> None:
    """Run `model`'s forward under torch.compile from now on, after dropping every graph compiled before."""
    torch.compiler.reset()
    model.compile()


def uncompile(model: nn.Module) -> None:
    """Give `model` back its plain forward (undoes `nn.Module.compile`, which has no public inverse)."""
    model._compiled_call_impl = None


@contextlib.contextmanager
def compiled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, `model` (the bare module, not a DDP wrapper) runs compiled when `enabled`."""
    if not enabled:
        yield
        return
    compile_in_place(model)
    try:
        yield
    finally:
        uncompile(model)
        torch.compiler.reset()
