"""Checkpoint files: atomic commit, manifest checks, damaged ones skipped, the stage table written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from aip import checkpoint as ckpt
from aip.report import write_report


def _write(run_dir: Path, stage: int, payload: bytes = b"weights") -> Path:
    tmp = ckpt.begin(run_dir, stage)
    (tmp / ckpt.STATE_DIR).mkdir()
    (tmp / ckpt.STATE_DIR / "model.safetensors").write_bytes(payload * 100)
    return ckpt.commit(tmp, run_dir, stage, [["conv", True, [1, 2]]], {"stage": stage})


def test_commit_writes_a_verified_checkpoint_and_no_temporary_is_left(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    assert path == tmp_path / "checkpoints" / "stage-01"
    assert ckpt.verify(path) is None
    history, meta = ckpt.read(path)
    assert history == [["conv", True, [1, 2]]] and meta == {"stage": 1}
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
    return ckpt.commit(tmp, run_dir, stage, [], {"stage": stage - 1, "partial": {"stage": stage}}, step)


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
