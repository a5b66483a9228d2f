"""Finite checks: a run that diverges stops with one line naming where, and never saves NaN or Inf.

Losses are checked once per training step, on a stack of the step's terms (one device-to-host read), after the
backward pass is queued and before the optimizer steps, so a non-finite loss never reaches the weights. Weights are
checked again right before anything is written (checkpoint, teacher file, export): a step whose loss was finite can
still overflow its gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

HINT = "the run diverged; lower train.lr or the loss weights, or check the teacher and the data"


class NonFiniteError(RuntimeError):
    """A loss term, or a weight about to be saved, is NaN or infinite."""


def _any_process(bad: torch.Tensor, accelerator: Any | None) -> bool:
    """Whether `bad` (a count) is non-zero on any process, so that every process stops at the same step."""
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.float().to(accelerator.device), "sum")
    return bool(bad > 0)


def check_losses(terms: dict[str, torch.Tensor], accelerator: Any | None = None) -> None:
    """Raise NonFiniteError naming every non-finite scalar of `terms` (on this process, or on another one)."""
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
    finite = torch.isfinite(values)
    if not _any_process((~finite).sum(), accelerator):
        return
    rows = zip(terms, values.tolist(), finite.tolist(), strict=True)
    named = [f"{name} = {value:g}" for name, value, ok in rows if not ok]
    where = ", ".join(named) if named else "on another process"
    raise NonFiniteError(f"non-finite loss ({where}); {HINT}")


def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (one device-to-host read in all)."""
    tensors = [(n, t) for n, t in named if t.is_floating_point() and t.numel() > 0]
    if not tensors:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all().to(tensors[0][1].device) for _, t in tensors]).tolist()
    return [n for (n, _), ok in zip(tensors, flags, strict=True) if not ok]


def check_modules(what: str, modules: Iterable[nn.Module], accelerator: Any | None = None) -> None:
    """Raise NonFiniteError when a parameter or buffer of `modules` is NaN or infinite: `what` is not saved."""
    bad = [n for m in modules for n in non_finite_tensors([*m.named_parameters(), *m.named_buffers()])]
    if _any_process(torch.tensor(len(bad)), accelerator):
        first = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "") if bad else "on another process"
        raise NonFiniteError(f"not writing {what}: non-finite weights ({first}); {HINT}")


def check_state(what: str, state: dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteError when a tensor of the state dict `state` is NaN or infinite: `what` is not saved."""
    bad = non_finite_tensors(state.items())
    if bad:
        first = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise NonFiniteError(f"not writing {what}: non-finite weights ({first}); {HINT}")


def check_outputs(what: str, model: nn.Module, inputs: Any, cause: str) -> None:
    """Raise NonFiniteError when `model` in eval mode returns a NaN or an infinity on `inputs` (every module's mode
    is kept): a network whose running statistics or weights overflowed, which train mode's batch statistics hide."""
    modes = [(m, m.training) for m in model.modules()]  # each module's own: a view shares a model's modules
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs)
    finally:
        for module, training in modes:
            module.training = training
    flat, _ = tree_flatten(out)
    if any(torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in flat):
        raise NonFiniteError(f"{what}: non-finite outputs in eval mode on the example batch; {cause}")
