"""Detection under `accelerate launch` with two CPU processes: the same channels pruned as one process, and mAP
gathered over both processes' shares of an uneven validation set equal to one process's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aip import checkpoint as ckpt
from aip.train import main
from tests.test_detection_run import tiny_detection
from tests.test_distributed import _launch_2proc


def _config(path: Path, **overrides: object) -> Path:
    path.write_text(yaml.safe_dump(tiny_detection(**overrides)))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("det_teacher")
    config = _config(tmp / "teacher.yaml", mode="train", **{"train.epochs": 2})
    assert main(["--config", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "model.pt"


def test_two_processes_prune_a_detector_identically_and_measure_the_same_map(teacher: Path, tmp_path: Path) -> None:
    overrides = {
        "model.teacher_checkpoint": str(teacher),
        "prune.epochs_between": 0,
        "prune.finetune_epochs": 0,
        "data.val_size": 11,  # 11 images in batches of 4 on 2 processes: the last batch is padded, then dropped
        "data.eval_batch_size": 4,
    }
    config = _config(tmp_path / "c.yaml", **overrides)
    assert main(["--config", str(config), "--out", str(tmp_path / "one")]) == 0
    done = _launch_2proc("--config", str(config), "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one = ckpt.read(ckpt.stage_dir(tmp_path / "one", 2))[0]
    two = ckpt.read(ckpt.stage_dir(tmp_path / "two", 2))[0]
    assert one == two
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    assert reports[0]["teacher"]["map50"] > 0
    rows = [[r["teacher"], *r["stages"]] for r in reports]
    for a, b in zip(*rows, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
