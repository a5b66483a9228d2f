"""Default attention-transfer taps of a detector: the modules whose outputs are the feature maps its heads read."""

from __future__ import annotations

import torch
from torch import nn

from aip.hooks import inspecting

MAX_TAPS = 4


@torch.no_grad()
def detection_taps(detector: nn.Module, image_size: int, max_taps: int = MAX_TAPS) -> list[str]:
    """Names (as in `detector.named_modules()`) of the modules that output the backbone's feature levels, finest
    first, at most `max_taps`: SSD's backbone stages and extra blocks, the FPN's output convolutions of R-CNN and
    RetinaNet. Found by one probe forward of the backbone; levels made without a module (SSD300's L2-normalised
    conv4_3, the FPN's max-pooled level) are left out. ValueError when fewer than two levels come from modules.
    """
    backbone = detector.backbone
    prefix = next(name for name, m in detector.named_modules() if m is backbone)
    made_by: dict[int, tuple[torch.Tensor, str]] = {}  # the tensor is kept alive, so its id is not reused

    def keep(name: str):
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                made_by[id(out)] = (out, name)  # the outermost module that returns this tensor finishes last

        return hook

    param = next(backbone.parameters())
    example = torch.rand(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    hooks = {m: keep(f"{prefix}.{name}") for name, m in backbone.named_modules() if name}
    with inspecting(backbone, hooks):
        features = backbone(example)
        levels = [features] if isinstance(features, torch.Tensor) else list(features.values())
        names = [made_by[id(f)][1] for f in levels if id(f) in made_by]
    if len(names) < 2:
        raise ValueError(
            f"cannot find two feature levels made by modules in {type(detector).__name__}'s backbone; set model.taps"
        )
    return names[:max_taps]
