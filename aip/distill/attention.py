"""Attention transfer (Zagoruyko & Komodakis): match where student and teacher feature maps are active."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce


def attention_map(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per sample, the channel mean of squared activations, flattened and L2-normalised: shape (N, H*W).

    With `size`, the spatial map is first resized (bilinear) to it, so maps of different resolutions compare.
    Channel counts may differ between student and teacher: the map averages over channels.
    """
    amap = reduce(x.float().pow(2), "n c h w -> n 1 h w", "mean")
    if size is not None and tuple(amap.shape[-2:]) != tuple(size):
        amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)
    return F.normalize(amap.flatten(1), dim=1)


def attention_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over taps of the mean squared difference of the attention maps (student resized to the teacher's size)."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student taps against {len(teacher_feats)} teacher taps")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats, strict=True):
        total = total + (attention_map(s, tuple(t.shape[-2:])) - attention_map(t)).pow(2).mean()
    return total
