"""The pruned detector as files: `model_pruned.pt` (weights, pruning history and config) always, read back by
`load_pruned_detector`; with export.formats pt2, also a `torch.export` program of the eval-mode detector when it
traces (torchvision's detectors mostly do not: post-processing has data-dependent shapes)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aip.checkpoint import CheckpointError
from aip.models.user import given_copy
from aip.prune.restore import rebuild
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.prunable import PrunableDetector, head_layers

if TYPE_CHECKING:
    from aip.tasks.base import ExportTarget

WEIGHTS_FILE = "model_pruned.pt"
PT2_FILE = "model_pruned.pt2"


class _Batch(nn.Module):
    """The detector on a batch tensor (N, 3, H, W): what torch.export takes; returns boxes, scores, labels per image."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(d["boxes"], d["scores"], d["labels"]) for d in self.detector(list(images))]


def save_pruned(
    path: Path, model: nn.Module, history: list, config: dict[str, Any], num_classes: int, given: str | None = None
) -> None:
    """Weights, pruning history and the config that rebuilds the architecture, in one torch.save file (`given`: the
    class of a detector given to the run as an object, which the config does not name)."""
    payload = {"config": config, "num_classes": num_classes, "history": history, "state_dict": model.state_dict()}
    payload["given"] = given
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_pruned_detector(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The pruned detector of a run's `model_pruned.pt` (or a stage's payload), in eval mode: a fresh detector of the
    configured family (or a copy of `model`, the unpruned detector a run was given), the pruning history replayed
    through its prunable view (the same module names), the weights loaded (`aip.prune.restore.rebuild`, as
    `aip.load_pruned` and resume do)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg, classes, history, state = (payload[k] for k in ("config", "num_classes", "history", "state_dict"))
    except Exception as exc:  # noqa: BLE001 - torch.load and pickle raise their own, a missing key a KeyError
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{str(path)!r} is not a pruned detector's {WEIGHTS_FILE} ({type(exc).__name__}: {first})"
        ) from None
    size = cfg["data"]["image_size"]
    detector = given_copy(model, payload.get("given"))
    if detector is None:
        detector = create_detector(cfg["model"]["name"], classes, size, **cfg["model"]["kwargs"])
    detector.eval()
    view = PrunableDetector(detector).eval()
    rebuild(detector, (view, view.batch([torch.zeros(3, size, size)]), head_layers(detector)), history, state)
    return detector.eval()


def _pt2(model: nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Write the torch.export program of `model`; the reason (one line) when it does not trace."""
    logging.disable(logging.CRITICAL)  # a failed trace prints and logs the whole graph
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(_Batch(model).eval(), (example,), strict=False)
        torch.export.save(program, path)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to the weights file
        return " ".join(str(exc).split())[:160] or type(exc).__name__
    finally:
        logging.disable(logging.NOTSET)
    return None


def write_detection_exports(target: ExportTarget, model: nn.Module, history: list, only_stale: bool) -> list[str]:
    """model_pruned.pt always (and model_pruned.pt2 when export.formats has pt2 and it traces); says which."""
    run_dir, formats, written = target.run_dir, target.cfg.export.formats, []
    weights = run_dir / WEIGHTS_FILE
    if not (only_stale and weights.is_file()):
        save_pruned(weights, model, history, target.cfg.to_dict(), target.num_classes, target.given)
        written.append(WEIGHTS_FILE)
    if "pt2" in formats and not (only_stale and (run_dir / PT2_FILE).is_file()):
        was_training = model.training
        reason = _pt2(model.eval(), target.example, run_dir / PT2_FILE)
        model.train(was_training)
        if reason is None:
            written.append(PT2_FILE)
        else:
            target.print(f"pt2: the detector does not trace with torch.export ({reason})")
    if "onnx" in formats:
        target.print("onnx: not written for detectors")
    if written:
        target.print(
            f"exported {', '.join(written)}; rebuild the pruned detector with aip.load_pruned({str(weights)!r})"
        )
    return written
