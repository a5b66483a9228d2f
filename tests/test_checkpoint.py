"""Checkpoint files: atomic commit, manifest checks, damaged ones skipped, the stage table written."""

from __future__ import annotations

import errno
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aip import checkpoint as ckpt
from aip.report import write_report


def _write(run_dir: Path, stage: int, payload: bytes = b"weights") -> Path:
    tmp = ckpt.begin(run_dir, stage)
    (tmp / ckpt.STATE_DIR).mkdir()
    (tmp / ckpt.STATE_DIR / "model.safetensors").write_bytes(payload * 100)
    return ckpt.commit(tmp, run_dir, stage, [["conv", True, [1, 2]]], {"stage": stage, "state": {"stage": stage}})


def test_commit_writes_a_verified_checkpoint_and_no_temporary_is_left(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    assert path == tmp_path / "checkpoints" / "stage-01"
    assert ckpt.verify(path) is None
    history, meta = ckpt.read(path)
    assert history == [["conv", True, [1, 2]]] and meta == {"stage": 1, "state": {"stage": 1}}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["stage-01"]


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    weights = newest / ckpt.STATE_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.warns(UserWarning, match="stage-02.*bytes"):
        assert ckpt.latest_valid(tmp_path) == tmp_path / "checkpoints" / "stage-01"
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.read(newest)


def test_corrupted_bytes_of_the_same_size_are_detected(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    weights = path / ckpt.STATE_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum" in ckpt.verify(path)


def test_an_unfinished_write_is_never_picked(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    tmp = ckpt.begin(tmp_path, 2)  # a crash here leaves only the temporary directory
    (tmp / "meta.json").write_text("{}")
    assert ckpt.latest_valid(tmp_path) == tmp_path / "checkpoints" / "stage-01"


def test_rewriting_a_stage_replaces_it_whole_and_keep_prunes_old_ones(tmp_path: Path) -> None:
    for stage in (1, 2, 3):
        _write(tmp_path, stage)
    _write(tmp_path, 3, b"other")
    assert ckpt.verify(ckpt.stage_dir(tmp_path, 3)) is None
    ckpt.prune_old(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["stage-02", "stage-03"]


def test_report_json_and_markdown(tmp_path: Path) -> None:
    teacher = {"params": 1000, "flops": 4_000_000, "top1": 90.0, "top5": 99.0}
    stages = [{"stage": 1, "kind": "prune", "params": 600, "flops": 2_000_000, "top1": 88.5, "top5": 98.0}]
    table = write_report(tmp_path, teacher, stages)
    assert json.loads((tmp_path / "report.json").read_text()) == {"teacher": teacher, "stages": stages}
    assert "| 1 | prune | 600 | 2.00M | 88.50 | 98.00 | 0.600 | 0.500 | -1.50 |" in table
    assert table in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_step(run_dir: Path, stage: int, step: int) -> Path:
    tmp = ckpt.begin(run_dir, stage, step)
    (tmp / ckpt.STATE_DIR).mkdir()
    (tmp / ckpt.STATE_DIR / "model.safetensors").write_bytes(b"mid-stage" * 100)
    meta = {"stage": stage, "state": {"stage": stage - 1}, "partial": {"stage": stage, "epoch": 0, "batch": 1}}
    return ckpt.commit(tmp, run_dir, stage, [], meta, step)


def test_a_completed_stage_wins_over_its_mid_stage_checkpoints(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    end = _write(tmp_path, 2)
    # As after a crash between renaming the stage end into place and removing the stage's mid-stage checkpoint.
    step = _write_step(tmp_path, 2, 40)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["stage-01", step.name, "stage-02"]
    assert ckpt.latest_valid(tmp_path) == end
    later = _write_step(tmp_path, 3, 70)
    assert ckpt.latest_valid(tmp_path) == later  # a later stage's progress still counts


def test_committing_a_stage_end_removes_that_stage_s_mid_stage_checkpoints(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    _write_step(tmp_path, 2, 10)
    _write_step(tmp_path, 2, 20)  # replaces the step-10 one
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["stage-01", "stage-02-step-00000020"]
    _write(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["stage-01", "stage-02"]


def _rewrite(path: Path, name: str, text: str | None) -> None:
    """Change (or with None delete) one file of a checkpoint and re-record the manifest, as a bad tool would."""
    target = path / name
    if text is None:
        target.unlink()
    else:
        target.write_text(text)
    ckpt.write_manifest(path)


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("history.json", None, "history.json is missing"),
        ("meta.json", None, "meta.json is missing"),
        (f"{ckpt.STATE_DIR}/model.safetensors", None, "model.safetensors is missing"),
        ("history.json", "{not json", "history.json is not valid JSON"),
        ("meta.json", "[1, 2]", "meta.json is not a JSON object"),
        ("history.json", '{"a": 1}', "history.json is not a JSON list"),
    ],
)
def test_a_checkpoint_missing_history_meta_or_weights_is_damaged(
    tmp_path: Path, name: str, text: str | None, reason: str
) -> None:
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    _rewrite(newest, name, text)
    assert reason in ckpt.verify(newest)
    with pytest.warns(UserWarning, match="stage-02"):
        assert ckpt.latest_valid(tmp_path) == ckpt.stage_dir(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.read(newest)


@pytest.mark.parametrize(
    "manifest",
    [
        [["history.json", 2, "00"]],
        {"history.json": {"size": 2}},
        {"history.json": {"sha256": "00"}},
        {"history.json": {"size": "2", "sha256": "00"}},
        {"history.json": 5},
        "text",
    ],
)
def test_a_manifest_of_the_wrong_shape_is_damaged(tmp_path: Path, manifest: object) -> None:
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert "manifest is malformed" in ckpt.verify(newest)
    with pytest.warns(UserWarning, match="stage-02"):
        assert ckpt.latest_valid(tmp_path) == ckpt.stage_dir(tmp_path, 1)


def test_a_failed_write_leaves_no_temporary_and_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    tmp = ckpt.begin(tmp_path, 2)
    (tmp / "partial.bin").write_bytes(b"x" * 10)
    error = ckpt.failed_write(tmp_path, 2, None, OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(error, ckpt.CheckpointError)
    assert "No space left on device" in str(error) and "stage-01, is kept" in str(error)
    assert not tmp.exists() and ckpt.latest_valid(tmp_path) == ckpt.stage_dir(tmp_path, 1)
    assert ckpt.is_write_failure(
        RuntimeError(
            "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: file write failed"
        )
    )
    assert not ckpt.is_write_failure(RuntimeError("size mismatch for conv1.weight"))


def _write_tensors(run_dir: Path, stage: int, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A stage-end checkpoint whose weights are a real safetensors file."""
    tmp = ckpt.begin(run_dir, stage)
    (tmp / ckpt.STATE_DIR).mkdir()
    tensors = tensors or {"conv.weight": torch.ones(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(3)}
    save_file(tensors, str(tmp / ckpt.STATE_DIR / "model.safetensors"))
    return ckpt.commit(tmp, run_dir, stage, [["conv", True, [1]]], {"stage": stage, "state": {"stage": stage}})


def test_commit_records_the_architecture_of_the_weights_and_their_history(tmp_path: Path) -> None:
    path = _write_tensors(tmp_path, 1)
    record = json.loads((path / ckpt.ARCHITECTURE).read_text())
    assert record["tensors"] == {
        "state/model.safetensors": {"bn.num_batches_tracked": ["I64", []], "conv.weight": ["F32", [4, 3, 3, 3]]}
    }
    assert record["history_sha256"] == hashlib.sha256((path / "history.json").read_bytes()).hexdigest()
    assert ckpt.ARCHITECTURE in json.loads((path / ckpt.MANIFEST).read_text())
    assert ckpt.verify(path) is None


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path / ckpt.STATE_DIR / "model.safetensors"))


REHASHED = {  # weights rewritten and the manifest re-recorded, as a tool would: the checksums all match
    "nan": (
        lambda p: _save(
            p, {"conv.weight": torch.full((4, 3, 3, 3), math.nan), "bn.num_batches_tracked": torch.tensor(3)}
        ),
        "state/model.safetensors: conv.weight holds NaN or infinite values",
    ),
    "inf": (
        lambda p: _save(p, {"conv.weight": torch.ones(4, 3, 3, 3) / 0, "bn.num_batches_tracked": torch.tensor(3)}),
        "conv.weight holds NaN or infinite values",
    ),
    "shape": (
        lambda p: _save(p, {"conv.weight": torch.ones(5, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(3)}),
        "conv.weight is F32 [5, 3, 3, 3], the architecture has F32 [4, 3, 3, 3]",
    ),
    "dtype": (
        lambda p: _save(p, {"conv.weight": torch.ones(4, 3, 3, 3).half(), "bn.num_batches_tracked": torch.tensor(3)}),
        "conv.weight is F16 [4, 3, 3, 3], the architecture has F32",
    ),
    "missing_tensor": (
        lambda p: _save(p, {"conv.weight": torch.ones(4, 3, 3, 3)}),
        "bn.num_batches_tracked is missing",
    ),
    "extra_tensor": (
        lambda p: _save(
            p, {"conv.weight": torch.ones(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(3), "x": torch.ones(1)}
        ),
        "x is not in the recorded architecture",
    ),
    "garbage": (
        lambda p: (p / ckpt.STATE_DIR / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}"),
        "state/model.safetensors is not a readable safetensors file",
    ),
    "history": (
        lambda p: (p / "history.json").write_text('[["conv", true, [1, 2]]]'),
        "history.json is not the pruning history the weights were saved with",
    ),
    "record": (lambda p: (p / ckpt.ARCHITECTURE).write_text("[]"), "architecture.json is malformed"),
}


@pytest.mark.parametrize("case", list(REHASHED))
def test_rehashed_weights_of_another_architecture_or_not_finite_are_damaged(tmp_path: Path, case: str) -> None:
    change, reason = REHASHED[case]
    _write_tensors(tmp_path, 1)
    newest = _write_tensors(tmp_path, 2)
    change(newest)
    ckpt.write_manifest(newest)
    assert reason in ckpt.verify(newest)
    with pytest.warns(UserWarning, match="stage-02"):
        assert ckpt.latest_valid(tmp_path) == ckpt.stage_dir(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.read(newest)


def test_a_checkpoint_without_architecture_record_is_still_checked_for_finite_readable_weights(tmp_path: Path) -> None:
    """Checkpoints written before the record existed resume as before, but never with non-finite weights."""
    path = _write_tensors(tmp_path, 1)
    (path / ckpt.ARCHITECTURE).unlink()
    ckpt.write_manifest(path)
    assert ckpt.verify(path) is None
    _save(path, {"conv.weight": torch.tensor([1.0, math.inf])})
    ckpt.write_manifest(path)
    assert ckpt.verify(path) == "state/model.safetensors: conv.weight holds NaN or infinite values"


def test_a_file_the_manifest_does_not_list_or_a_path_outside_the_checkpoint_is_damage(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    (path / ckpt.STATE_DIR / "optimizer.bin").write_bytes(b"written after the manifest")
    assert ckpt.verify(path) == "state/optimizer.bin is not in the manifest"
    ckpt.write_manifest(path)
    assert ckpt.verify(path) is None
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["../../config.yaml"] = {"size": 1, "sha256": "00"}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert "manifest is malformed" in ckpt.verify(path)


END = {"stage": 2, "state": {"stage": 2}}
MID = {"stage": 2, "state": {"stage": 1}, "partial": {"stage": 2, "epoch": 0, "batch": 3}}


def _write_meta(run_dir: Path, step: int | None, meta: dict) -> Path:
    tmp = ckpt.begin(run_dir, 2, step)
    (tmp / ckpt.STATE_DIR).mkdir()
    (tmp / ckpt.STATE_DIR / "model.safetensors").write_bytes(b"weights")
    return ckpt.commit(tmp, run_dir, 2, [], meta, step)


@pytest.mark.parametrize(
    ("step", "meta", "reason"),
    [
        (None, {**END, "stage": 3}, "meta.json says stage 3, the checkpoint is of stage 2"),
        (None, {**END, "state": {"stage": 1}}, "meta.json says 1 stage(s) completed, in a checkpoint at the end of"),
        (None, {**END, "partial": MID["partial"]}, "meta.json has a mid-stage position at a stage end"),
        (None, {"stage": 2}, "meta.json is malformed"),
        (None, {**END, "stage": "2"}, "meta.json is malformed"),
        (40, {**MID, "partial": {"stage": 3, "epoch": 0, "batch": 3}}, "meta.json says stage 3, the checkpoint is of"),
        (40, {**MID, "state": {"stage": 2}}, "meta.json says 2 stage(s) completed, in a checkpoint inside stage 2"),
        (40, {**MID, "partial": {"stage": 2}}, "meta.json is malformed (a mid-stage position needs"),
        (40, END, "meta.json has no mid-stage position"),
    ],
)
def test_meta_that_contradicts_the_checkpoint_s_name_is_damage(
    tmp_path: Path, step: int | None, meta: dict, reason: str
) -> None:
    _write(tmp_path, 1)
    newest = _write_meta(tmp_path, step, meta)
    assert reason in ckpt.verify(newest)
    with pytest.warns(UserWarning, match=newest.name):
        assert ckpt.latest_valid(tmp_path) == ckpt.stage_dir(tmp_path, 1)
    assert ckpt.verify(_write_meta(tmp_path, step, MID if step else END)) is None  # the same with its own meta
