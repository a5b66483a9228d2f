"""Stage checkpoints: written under a temporary name and renamed, with a manifest that resume checks.

A checkpoint directory `checkpoints/stage-NN/` holds Accelerate's saved state (`state/`: student and discriminator
weights, optimizer, scheduler and RNG states), `history.json` (the Torch-Pruning history: the student's architecture)
and `meta.json` (stage, step counters, the report rows so far). `architecture.json` records, when the checkpoint is
written, the dtype and shape of every tensor of its safetensors files and the SHA-256 of the history they belong to.
`manifest.json` lists every file with its size and SHA-256. A checkpoint is treated as damaged, and skipped, when a
file does not match the manifest or is not listed in it, when meta.json contradicts the checkpoint's name, and when
its weights hold a NaN or an infinity or do not have the recorded shapes (checked even where a tool re-recorded the
manifest after changing a file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ARCHITECTURE = "architecture.json"
STATE_DIR = "state"
# What resume needs of every checkpoint: the architecture, the run state and the student's weights.
REQUIRED = ("history.json", "meta.json", f"{STATE_DIR}/model.safetensors")
_NAME = re.compile(r"stage-(\d+)(?:-step-(\d+))?")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def stage_dir(run_dir: Path, stage: int, step: int | None = None) -> Path:
    """`stage-NN` for the end of a stage; `stage-NN-step-SSSSSSSS` for a checkpoint in the middle of stage NN."""
    name = f"stage-{stage:02d}" + (f"-step-{step:08d}" if step is not None else "")
    return Path(run_dir) / "checkpoints" / name


def _order(path: Path) -> tuple[int, int, int]:
    """Oldest first: stage NN's mid-stage checkpoints by step, then its end (the completed stage comes last)."""
    stage, step = _NAME.fullmatch(path.name).groups()
    return (int(stage), 0, int(step)) if step is not None else (int(stage), 1, 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    """Record size and checksum of every file under `root`, so that truncation or corruption is detected."""
    entries = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    (root / MANIFEST).write_text(json.dumps(entries, indent=1, sort_keys=True))


def verify(root: Path) -> str | None:
    """None when the checkpoint at `root` matches its manifest, its meta its name and its weights the recorded
    architecture, all finite; else a short reason."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return "no manifest (unfinished write?)"
    try:
        entries = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest is unreadable"
    if not _well_formed(entries):
        return "manifest is malformed (expected file: {size, sha256} entries)"
    for rel in REQUIRED:
        if rel not in entries:
            return f"{rel} is missing"
    for rel, want in entries.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match its checksum"
    unlisted = [rel for rel in (str(p.relative_to(root)) for p in _files(root)) if rel not in entries]
    if unlisted:
        return f"{unlisted[0]} is not in the manifest"
    for rel, kind in (("history.json", list), ("meta.json", dict)):
        try:
            if not isinstance(json.loads((root / rel).read_text()), kind):
                return f"{rel} is not a JSON {'list' if kind is list else 'object'}"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{rel} is not valid JSON"
    return _meta_reason(root) or _weights_reason(root)


def _meta_reason(root: Path) -> str | None:
    """Why meta.json cannot be this checkpoint's: its stage, run state or mid-stage position contradict the
    directory's name `stage-NN[-step-S]` (a checkpoint under another name is checked for the shape of meta only)."""
    meta = json.loads((root / "meta.json").read_text())
    stage, state, partial = meta.get("stage"), meta.get("state"), meta.get("partial")
    if not _is_int(stage) or not isinstance(state, dict) or not _is_int(state.get("stage", 0)):
        return "meta.json is malformed (expected an integer stage and a run state)"
    if partial is not None and not (isinstance(partial, dict) and all(_is_int(partial.get(k)) for k in _PARTIAL)):
        return "meta.json is malformed (a mid-stage position needs stage, epoch and batch)"
    name = _NAME.fullmatch(root.name)
    if name is None:
        return None
    own, mid = int(name.group(1)), name.group(2) is not None
    if stage != own or (partial is not None and partial["stage"] != own):
        return f"meta.json says stage {partial['stage'] if stage == own else stage}, the checkpoint is of stage {own}"
    if mid != (partial is not None):
        return "meta.json " + ("has no mid-stage position" if mid else "has a mid-stage position at a stage end")
    done = state.get("stage")
    if done is not None and ((done >= own) if mid else (done != own)):
        where = f"inside stage {own}" if mid else f"at the end of stage {own}"
        return f"meta.json says {done} stage(s) completed, in a checkpoint {where}"
    return None


_PARTIAL = ("stage", "epoch", "batch")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _weight_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def _shapes(path: Path) -> dict[str, list] | None:
    """{tensor name: [dtype, shape]} from a safetensors file's header; None when it is not a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: [fh.get_slice(k).get_dtype(), list(fh.get_slice(k).get_shape())] for k in fh.keys()}
    except Exception:  # safetensors raises its own error types for a damaged header
        return None


def write_architecture(root: Path) -> None:
    """Record the dtype and shape of every tensor of the checkpoint's safetensors files (null for a file that is not
    one) and the SHA-256 of its history.json: what its weights must still match when it is resumed."""
    record = {
        "history_sha256": _sha256(root / "history.json"),
        "tensors": {str(p.relative_to(root)): _shapes(p) for p in _weight_files(root)},
    }
    (root / ARCHITECTURE).write_text(json.dumps(record, indent=1, sort_keys=True))


def _weights_reason(root: Path) -> str | None:
    """Why the checkpoint's weights are not usable: not the architecture recorded with them, or not finite."""
    recorded: dict[str, Any] = {}
    if (root / ARCHITECTURE).is_file():
        try:
            record = json.loads((root / ARCHITECTURE).read_text())
            recorded, history = dict(record["tensors"]), record["history_sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            return f"{ARCHITECTURE} is malformed"
        if not all(want is None or isinstance(want, dict) for want in recorded.values()):
            return f"{ARCHITECTURE} is malformed"
        if history != _sha256(root / "history.json"):
            return "history.json is not the pruning history the weights were saved with"
    for rel, want in recorded.items():
        if want is not None and not (root / rel).is_file():
            return f"{rel} is missing"
    for path in _weight_files(root):
        rel = str(path.relative_to(root))
        if rel in recorded and recorded[rel] is None:
            continue  # not a safetensors file when it was written (a stand-in): nothing to hold it to
        found = _shapes(path)
        if found is None:
            return f"{rel} is not a readable safetensors file"
        if rel in recorded and found != recorded[rel]:
            return f"{rel}: {_mismatch(found, recorded[rel])}"
        bad = _non_finite(path)
        if bad is not None:
            return f"{rel}: {bad} holds NaN or infinite values"
    return None


def _mismatch(found: dict[str, list], want: dict[str, list]) -> str:
    """The first tensor whose presence, dtype or shape differs from the recorded architecture, in words."""
    for key in sorted(set(found) | set(want)):
        if key not in found:
            return f"{key} is missing"
        if key not in want:
            return f"{key} is not in the recorded architecture"
        if found[key] != want[key]:
            (dtype, shape), (want_dtype, want_shape) = found[key], want[key]
            return f"{key} is {dtype} {shape}, the architecture has {want_dtype} {want_shape}"
    return "the tensors differ from the recorded architecture"


def _non_finite(path: Path) -> str | None:
    """The first floating-point tensor of a safetensors file that holds a NaN or an infinity, or None."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        for key in sorted(fh.keys()):
            tensor = fh.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return key
    return None


def _well_formed(entries: Any) -> bool:
    """A manifest maps relative paths inside the checkpoint to {"size": int, "sha256": str}; anything else is
    damaged."""
    return isinstance(entries, dict) and all(
        not Path(rel).is_absolute()
        and ".." not in Path(rel).parts
        and isinstance(want, dict)
        and isinstance(want.get("size"), int)
        and not isinstance(want.get("size"), bool)
        and isinstance(want.get("sha256"), str)
        for rel, want in entries.items()
    )


def temporary(run_dir: Path, stage: int, step: int | None = None) -> Path:
    """Where the checkpoint is written before `commit` renames it into place."""
    final = stage_dir(run_dir, stage, step)
    return final.with_name(f".{final.name}.tmp")


def begin(run_dir: Path, stage: int, step: int | None = None) -> Path:
    """A fresh temporary directory beside the final one, for the checkpoint to be written into."""
    tmp = temporary(run_dir, stage, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


_WRITE_FAILURE = re.compile(r"no space left|disk quota|storagefull|file write failed|errno 28", re.IGNORECASE)


def is_write_failure(exc: BaseException) -> bool:
    """An OSError, or what torch and safetensors raise in its place when the disk is full."""
    return isinstance(exc, OSError) or bool(_WRITE_FAILURE.search(str(exc)))


def failed_write(run_dir: Path, stage: int, step: int | None, exc: BaseException) -> CheckpointError:
    """Remove the temporary directory of a checkpoint whose write failed (a full disk, say) and say so in one line;
    the checkpoints already committed stay as they were."""
    shutil.rmtree(temporary(run_dir, stage, step), ignore_errors=True)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
    kept = [p.name for p in list_checkpoints(run_dir) if verify(p) is None]
    last = f"the last good checkpoint, {kept[-1]}, is kept" if kept else "no earlier checkpoint exists"
    return CheckpointError(f"cannot write checkpoint {stage_dir(run_dir, stage, step)}: {reason}; {last}")


def commit(tmp: Path, run_dir: Path, stage: int, history: list, meta: dict[str, Any], step: int | None = None) -> Path:
    """Add history, meta, the architecture record and the manifest to the temporary directory, then rename it into
    place atomically.

    Mid-stage checkpoints older than the new one are removed afterwards: only the newest is worth resuming from.
    """
    (tmp / "history.json").write_text(json.dumps(history))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    write_architecture(tmp)
    write_manifest(tmp)
    final = stage_dir(run_dir, stage, step)
    if final.exists():  # a stage re-run after a resume: move the old one aside, never write into it
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for path in list_checkpoints(run_dir):
        if path != final and "-step-" in path.name and _order(path) < _order(final):
            shutil.rmtree(path, ignore_errors=True)
    return final


def prune_old(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` end-of-stage checkpoints (keep 0: delete none)."""
    if keep <= 0:
        return
    for path in [p for p in list_checkpoints(run_dir) if "-step-" not in p.name][:-keep]:
        shutil.rmtree(path)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (damaged ones included; temporaries not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=_order)


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that matches its manifest; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        reason = verify(path)
        if reason is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {reason}", stacklevel=2)
    return None


def read(path: Path) -> tuple[list, dict[str, Any]]:
    """The history and meta of a checkpoint, after checking it against its manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {str(path)!r}")
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {reason}")
    return json.loads((path / "history.json").read_text()), json.loads((path / "meta.json").read_text())
