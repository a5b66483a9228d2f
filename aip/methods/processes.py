"""What the processes of a run must agree on: the architecture each pruned to (a mismatch would corrupt DDP),
`measure()` on the main process with its result on every process, and calibration passes on the same batches
everywhere with their gradients averaged."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, send_to_device
from torch import nn
from torch.utils.data import DataLoader

from aip.seeding import derive_seed, seeded
from aip.session import Session


class RankMismatchError(RuntimeError):
    """Processes ended a prune with different architectures; continuing would corrupt DDP."""


def architecture_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer name and shape: equal iff two models have the same architecture."""
    shapes = [(n, tuple(t.shape)) for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    return format(int(hashlib.sha256(repr(shapes).encode()).hexdigest()[:15], 16), "x")


def check_same_architecture(session: Session, model: nn.Module, stage: int) -> list[str]:
    """Every process's architecture digest after a prune; stops the run if they differ."""
    digest = architecture_hash(model)
    acc = session.accelerator
    if acc.num_processes == 1:
        return [digest]
    codes = torch.tensor([int(digest, 16) % (1 << 62)], device=acc.device)
    gathered = [format(int(c), "x") for c in acc.gather(codes)]
    if len(set(gathered)) > 1:
        raise RankMismatchError(
            f"stage {stage}: processes pruned different channels (architecture digests {gathered}); "
            "use a deterministic criterion or reduce its statistics across processes"
        )
    return gathered


def calibration(session: Session, stage: int, batches: int | None = None) -> Callable[[nn.Module], None]:
    """Forward and backward passes on fixed training batches (the same on every process); `.grad` is averaged
    over processes. Gradient criteria read `.grad`, feature criteria and the capacity analysis hook the passes;
    called under torch.no_grad (a criterion that reads no gradients), it runs the forward passes only."""
    cfg = session.cfg

    def calibrate(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(cfg.seed * 7 + stage)
        loader = DataLoader(
            session.data.train,
            batch_size=cfg.data.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=session.task.collate,
        )
        device = session.accelerator.device
        with seeded(derive_seed(cfg.seed, "calibration", stage)):  # augmentation: not the global stream
            for i, (x, y) in enumerate(loader):
                if i == (batches or cfg.prune.calibration_batches):
                    break
                loss = session.task.loss(model, *send_to_device((x, y), device))
                if loss.requires_grad:
                    loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad = session.accelerator.reduce(p.grad, "mean")

    return calibrate


def on_main(session: Session, measure: Callable[[], Any]) -> Any:
    """`measure()` on the main process, its result on every process (timings differ between processes, and every
    process must prune the same channels)."""
    box = [measure() if session.main else None]
    if session.accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]
