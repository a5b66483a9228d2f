"""How a run meets Accelerate: the device decision, mixed precision from the config or the launcher, the
process-group timeout, and stepping two optimizers that share one GradScaler."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

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
