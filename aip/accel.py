"""How a run meets Accelerate: the device decision, mixed precision from the config or the launcher, the
process-group timeout, and stepping two optimizers that share one GradScaler."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from aip.config import Config, ConfigError

# With no accelerator present, tell Accelerate so: then several launched processes form a gloo group on the CPU
# (`accelerate launch --multi_gpu --num_processes 2` or torchrun), where otherwise each would run alone.
CPU_ONLY = not torch.accelerator.is_available()
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"


def mixed_precision(cfg: Config) -> str | None:
    """`train.mixed_precision`, or None (the default) to let Accelerate take the launcher's choice.

    `accelerate launch --mixed_precision bf16` reaches the processes as ACCELERATE_MIXED_PRECISION, which Accelerate
    reads only when it is given no value; a config value that contradicts it is refused rather than silently winning.
    """
    wanted, launcher = cfg.train.mixed_precision, os.environ.get(LAUNCHER_PRECISION)
    if wanted is not None and launcher is not None and launcher.lower() != wanted:
        raise ConfigError(
            f"train.mixed_precision: {wanted!r} contradicts the launcher's {launcher!r} ({LAUNCHER_PRECISION}, from "
            f"accelerate launch --mixed_precision or its config); make them agree, or set it to null to follow the "
            "launcher"
        )
    return wanted


def process_group_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of `init_process_group`: ACP waits at each swarm iteration for every process's share of the
    candidates, which can take far longer than NCCL's 10-minute default (`acp.timeout_minutes`)."""
    if cfg.mode != "acp":
        return {}
    return {"timeout": timedelta(minutes=cfg.acp.timeout_minutes)}


def step_before_update(optimizer: Any) -> None:
    """Step a prepared optimizer whose GradScaler another optimizer's `step()` updates afterwards.

    Accelerate's `step()` updates the shared scale after each optimizer; with gradient accumulation the
    discriminator's step would then change the scale between the student's micro-batches, and the student's
    accumulated gradients would be unscaled by the wrong factor. This steps (skipping on overflow) and leaves the
    one update of the window to the student's `step()`, which sees both optimizers' overflow checks.
    """
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None:
        optimizer.step()
    elif optimizer.gradient_state.sync_gradients:
        scaler.step(optimizer.optimizer)


def strip_autocast(model: nn.Module) -> nn.Module:
    """`model` (in place) as it was before a `prepare`: without the autocast wrapper a mixed-precision prepare put on
    its forward, and unmarked, so that preparing it again (after a prune) wraps it once, not once per stage (and
    its `_original_forward` stays its own forward)."""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        _set_forward(model, original)
    model.__dict__.pop("_is_accelerate_prepared", None)
    return model


def _set_forward(model: nn.Module, forward: Any) -> None:
    """Make `forward` the model's forward: its class's own (no instance attribute) when it is that one."""
    if getattr(forward, "__func__", None) is type(model).forward and getattr(forward, "__self__", None) is model:
        model.__dict__.pop("forward", None)
    else:
        model.forward = forward


@contextmanager
def plain_forward(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing in its own precision for the duration (fp32 for an fp32 model), without the autocast
    wrapper a mixed-precision `prepare` put on it: timings and checks compare it with the unprepared teacher."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield model
        return
    wrapped = model.__dict__.get("forward")
    _set_forward(model, original)
    try:
        yield model
    finally:
        if wrapped is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = wrapped


def local_process_count(num_processes: int) -> int:
    """The processes on this machine: LOCAL_WORLD_SIZE, which torchrun and `accelerate launch` set on every node
    (a multi-node job's `num_processes` counts every node's), else all `num_processes`."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else num_processes
