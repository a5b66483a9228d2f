"""Hardware-friendly widths: with `prune.round_to: N`, every pruned group keeps a width that is a multiple of N.

The rule: a group of original width W whose channels go in units of u (a grouped convolution or a chunked tensor
loses one channel of every piece at a time) may take the widths that are multiples of L = lcm(u, N), from the
smallest such multiple at or above its per-layer floor (and never below L) up to W, and W itself (left unpruned).
So a group narrower than L, or one whose floor rounds up to W, stays whole; a group whose W is no multiple of N drops
to the largest multiple below W on its first removal, and by L channels at a time after that. Without rounding
(N = 1) the allowed widths are the multiples of u, as Torch-Pruning's own pruners keep them.

`prune.round_to: auto` takes N from the kernels of the run's device (`device_round_to`): a width that is no multiple
of the kernels' channel block is padded up to one, so the FLOPs it saves take no time off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# fp32 lanes of a vector register by ATen's capability name (oneDNN's fp32 convolutions block channels by 16 under
# AVX-512 and by 8 under AVX2)
CPU_LANES = {"AVX512": 16, "AVX2": 8, "SVE256": 8}
# NVIDIA's Tensor Core guidance for fp16/bf16 convolutions and GEMMs: channel counts that are multiples of 8
CUDA_CHANNELS = 8


def device_round_to(device: torch.device) -> tuple[int, str]:
    """`prune.round_to: auto` on `device`: the channel multiple its kernels run best at, and what it was read from
    (1, any width, for a device whose kernels are not known here)."""
    if device.type == "cuda":
        return CUDA_CHANNELS, f"{torch.cuda.get_device_name(device)} tensor cores"
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        lanes = next((n for name, n in CPU_LANES.items() if capability.startswith(name)), 1)
        return lanes, f"CPU kernels {capability}"
    return 1, f"{device.type} (no known channel block: any width)"


@dataclass(frozen=True)
class WidthGrid:
    """The widths one group may take: multiples of `step` from `low` to below `original`, and `original`."""

    original: int
    step: int
    low: int

    @classmethod
    def make(cls, original: int, unit: int, round_to: int, floor: int) -> WidthGrid:
        """The grid of a group of `original` channels in units of `unit`, kept at or above `floor` channels."""
        step = math.lcm(max(1, unit), max(1, round_to))
        low = max(step, math.ceil(floor / step) * step)
        return cls(original, step, min(low, original))

    def below(self, width: int) -> list[int]:
        """Every allowed width under `width`, largest first."""
        top = (width - 1) // self.step * self.step
        return list(range(top, self.low - 1, -self.step)) if self.low < self.original else []

    def floor(self, width: float) -> int:
        """The largest allowed width at or under `width` (`low` when `width` is under every allowed width)."""
        if width >= self.original or self.low >= self.original:
            return self.original
        return max(self.low, math.floor(width / self.step + 1e-9) * self.step)

    def nearest(self, width: float) -> int:
        """The allowed width closest to `width` (the larger one on a tie)."""
        down = self.floor(width)
        if down == self.original:
            return down
        up = min(self.original, down + self.step)
        return up if up - width <= width - down else down


def blocks(width: int, unit: int, grid: WidthGrid) -> list[int]:
    """How many units each successive removal takes from a group now `width` wide, down to the grid's lowest width."""
    sizes, at = [], width
    for allowed in grid.below(width):
        sizes.append((at - allowed) // unit)
        at = allowed
    return sizes
