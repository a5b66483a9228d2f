"""`aip.load_pruned(run or stage checkpoint, model=None)`: the pruned student of a run as the user's own class, on the
CPU in eval mode, without the data set or a session: the model the checkpoint's config names (or the one given),
Torch-Pruning's history replayed and the weights loaded (`aip.prune.restore`, as resume does). `model_record` is
what each checkpoint's meta keeps for it."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from aip import checkpoint as ckpt
from aip.config import Config, config_from_dict
from aip.models.pretrained import architecture_only
from aip.models.user import given_copy, given_name
from aip.prune.restore import rebuild
from aip.seeding import seeded
from aip.tasks import task_for

RECORD = "model"  # the key of a checkpoint's meta.json that holds `model_record`
MODES = ("aip", "acp")  # the modes whose runs write stage checkpoints of a pruned student


@dataclass(frozen=True)
class Shapes:
    """What a task's `create_model` reads of the data: the class count and one input's (C, H, W)."""

    num_classes: int
    input_shape: tuple[int, ...]


def model_record(num_classes: int, example: torch.Tensor, given: nn.Module | None) -> dict[str, Any]:
    """What `load_pruned` needs besides the config to build the unpruned model without the data: the class count,
    the example input's shape and, for a model given as an object (which no config names), its class."""
    return {
        "num_classes": int(num_classes),
        "example_shape": [int(n) for n in example.shape],
        "given": None if given is None else given_name(given),
    }


def checkpoint_of(path: str | Path) -> Path:
    """The stage checkpoint `path` names: itself, or a run directory's newest valid end-of-stage checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"load_pruned: no run directory or stage checkpoint at {str(path)!r}")
    if (path / "meta.json").is_file() or (path / ckpt.MANIFEST).is_file():
        return path
    if not (path / "config.yaml").is_file():
        raise ckpt.CheckpointError(
            f"load_pruned: {str(path)!r} is neither a run directory (no config.yaml) nor a stage checkpoint "
            "(no meta.json); give a run directory or one of its checkpoints/stage-NN"
        )
    ends = [p for p in ckpt.list_checkpoints(path) if "-step-" not in p.name]
    for end in reversed(ends):
        reason = ckpt.verify(end)
        if reason is None:
            return end
        warnings.warn(f"skipping damaged checkpoint {end}: {reason}", stacklevel=3)
    if ends:
        raise ckpt.CheckpointError(f"load_pruned: every finished stage checkpoint of run {str(path)!r} is damaged")
    mode = _mode(path)
    why = f"a mode {mode} run saves none" if mode not in MODES else "it stopped before its first stage ended"
    raise ckpt.CheckpointError(f"load_pruned: run {str(path)!r} has no finished stage checkpoint to load ({why})")


def _mode(run_dir: Path) -> str:
    """The mode a run directory's config.yaml names ("?" when it cannot be read)."""
    try:
        return str((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("mode", "aip"))
    except (OSError, yaml.YAMLError, AttributeError):
        return "?"


def _config(meta: dict[str, Any]) -> Config:
    """The run's config as its checkpoint saved it, without the checks of the machine the run ran on (its teacher
    file and a C++ compiler): a pruned model is built from the weights here, and nothing is compiled."""
    saved = copy.deepcopy(meta.get("config") or {})
    saved.setdefault("model", {})["teacher_checkpoint"] = None
    saved.setdefault("train", {})["compile"] = False
    return config_from_dict(saved)


def _record(meta: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The checkpoint's model record; for one written before checkpoints kept it, read off the configured data."""
    if isinstance(meta.get(RECORD), dict):
        return meta[RECORD]
    task = task_for(cfg)
    data = task.build_data(cfg)
    return model_record(data.num_classes, task.example(data), None)


def _unpruned(cfg: Config, record: dict[str, Any], example: torch.Tensor, model: nn.Module | None) -> nn.Module:
    """A copy of the model given, or a fresh model of the configured family (its random initialisation drawn from
    streams of its own: the caller's are left as they were)."""
    copied = given_copy(model, record.get("given"))
    if copied is not None:
        return copied
    shapes = Shapes(int(record["num_classes"]), tuple(record["example_shape"][1:]))
    with seeded(cfg.seed):
        return task_for(cfg).create_model(architecture_only(cfg), shapes, example)  # the checkpoint's weights follow


def load_pruned(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The pruned student of a run directory (its newest finished stage) or of one stage checkpoint
    (`run/checkpoints/stage-02`), as the model's own class, on the CPU, in eval mode.

    `model`: the unpruned model, for a run given its model as an object (deep-copied, never modified); None builds
    the one the run's config names. A detector's `model_pruned.pt` file is read by `load_pruned_detector`.
    """
    if Path(path).is_file():
        if Path(path).suffix != ".pt":
            raise ckpt.CheckpointError(
                f"load_pruned: {str(path)!r} is a file; give a run directory or one of its checkpoints/stage-NN "
                "(or a detector's model_pruned.pt)"
            )
        from aip.tasks.detection.export import load_pruned_detector

        return load_pruned_detector(path, model)
    source = checkpoint_of(path)
    history, meta = ckpt.read(source)
    cfg = _config(meta)
    record = _record(meta, cfg)
    example = torch.zeros(record["example_shape"])
    student = _unpruned(cfg, record, example, model).eval()
    return rebuild(student, task_for(cfg).prunable(student, example), history, source).eval()
