"""Explicit seeds for everything random, so that a run and its resumed or restarted twin draw the same numbers.

The global random streams depend on what ran before (a teacher trained or loaded, a search run or read back), so
nothing that must be reproducible draws from them as they happen to be: a random construction (the discriminator's
initial weights, the calibration batches) runs under `seeded(derive_seed(seed, name, ...))`; every training batch
read per sample is fetched with the streams seeded from the epoch's seed and the batch's sample indices
(`SeededBatches`), and every batch is trained on with them seeded from the epoch's seed and its index (in-memory sets
are augmented on the device from that seed: `Session.train_inputs`). A resumed epoch can then skip its first batches
by index, without loading them, and still draw what an unbroken run draws.
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

from aip.batches import device_transform, fetch_batch


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
    a batch's random augmentation independent of which batches were fetched before. An in-memory uint8 set
    (`aip.batches.MemoryImages`) is fetched as one uint8 batch instead, to be augmented on the device
    (`device_transform`; the loader's `collate_fn` must then be `aip.batches.whole_batch`). Set `seed` (per epoch)
    before iterating: it lives in shared memory, so persistent workers see each epoch's value.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self._seed = torch.tensor([seed], dtype=torch.int64).share_memory_()
        self.device_transform = device_transform(dataset)

    @property
    def seed(self) -> int:
        """The epoch's seed, which each batch's seed derives from."""
        return int(self._seed[0])

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed[0] = value

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Any:
        if self.device_transform is not None:
            return fetch_batch(self.dataset, indices)  # augmented on the device, seeded per batch there
        set_seed(derive_seed(self.seed, tuple(int(i) for i in indices)))
        return [self.dataset[i] for i in indices]
