"""Recovery curves (`train.eval_each_epoch`): top-1 right after each prune and after every recovery epoch, the
stage-end point equal to the stage's row, and the same curve after a kill and resume at an epoch boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aip.train import main
from tests.conftest import tiny_run
from tests.test_resume import _run_killed_after


def _write(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_run(**overrides)))
    return path


CURVE = {
    "train.teacher_epochs": 1,
    "train.eval_each_epoch": True,
    "prune.epochs_between": 2,
    "prune.finetune_epochs": 2,
    "checkpoint.every_n_steps": 8,  # 256 images / 32 per batch: one checkpoint at the end of every epoch
}


def test_curve_has_a_point_per_prune_and_epoch_and_survives_a_kill_at_an_epoch_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(tmp_path / "c.yaml", **CURVE)
    assert main(["--config", str(config), "--out", str(tmp_path / "reference")]) == 0
    report = json.loads((tmp_path / "reference" / "report.json").read_text())
    points = [(p["stage"], p["kind"], p["epoch"]) for p in report["curve"]]
    assert points == [
        (1, "prune", 0),
        (1, "prune", 1),
        (1, "prune", 2),
        (2, "prune", 0),
        (2, "prune", 1),
        (2, "prune", 2),
        (3, "finetune", 1),
        (3, "finetune", 2),
    ]
    ends = {p["stage"]: p["top1"] for p in report["curve"] if p["epoch"] == 2}
    assert ends == {row["stage"]: row["top1"] for row in report["stages"]}

    run_dir = tmp_path / "killed"
    _run_killed_after(monkeypatch, ["--config", str(config), "--out", str(run_dir)], mid_stage=3)  # stage 2, epoch 1
    assert main(["--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "report.json").read_text()) == report


def test_without_eval_each_epoch_the_report_has_no_curve_and_training_is_unchanged(tmp_path: Path) -> None:
    """The per-epoch evaluations only observe: the stage rows are the same with and without them (so the ablation
    benchmark may skip them)."""
    stages = []
    for each in (False, True):
        config = _write(tmp_path / f"c{each}.yaml", **{"train.teacher_epochs": 1, "train.eval_each_epoch": each})
        assert main(["--config", str(config), "--out", str(tmp_path / f"run{each}")]) == 0
        report = json.loads((tmp_path / f"run{each}" / "report.json").read_text())
        assert ("curve" in report) == each
        stages.append(report["stages"])
    assert stages[0] == stages[1] and len(stages[0]) == 3
