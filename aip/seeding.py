"""Explicit seeds for everything random, so that a run and its resumed or restarted twin draw the same numbers.

The global random streams depend on what ran before (a teacher trained or loaded, a search run or read back), so
nothing that must be reproducible draws from them as they happen to be: a random construction (the discriminator's
initial weights, the calibration batches) runs under `seeded(derive_seed(seed, name, ...))`, and every training batch
is fetched with the streams seeded from the epoch's seed and the batch's sample indices (`SeededBatches`). A resumed
epoch can then skip its first batches by index, without loading them, and still draw what an unbroken run draws.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed determined by `parts` (numbers, strings, tuples of them): distinct parts, unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << 32)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global streams (torch, CUDA, Python, NumPy) seeded with `seed`, and give them back
    their previous state afterwards, so the block neither depends on nor disturbs what runs around it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        set_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededBatches(Dataset):
    """`dataset` whose batches are fetched with the global streams seeded from (`seed`, the batch's indices).

    A DataLoader fetches a whole batch through `__getitems__`, in the main process or a worker; seeding there makes
    a batch's random augmentation, and what the training step draws after it, independent of which batches were
    fetched before. Set `seed` (per epoch) before iterating: workers receive a copy when the iteration starts.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        set_seed(derive_seed(self.seed, tuple(int(i) for i in indices)))
        return [self.dataset[i] for i in indices]
