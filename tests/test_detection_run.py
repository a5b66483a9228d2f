"""Detection end to end on tiny settings: `mode: aip` on a tiny SSD and synthetic shapes reports mAP per stage within
the FLOPs target, its exported weights rebuild the pruned detector, and a run killed mid-stage resumes to the
unbroken run's report and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from aip.tasks.detection.export import load_pruned_detector
from aip.train import main
from tests.test_resume import _run_killed_after

IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def tiny_detection(**overrides: object) -> dict:
    """A seconds-long detection AIP run: tiny SSD on 32 px synthetic shapes, 2 intervals to 60% FLOPs."""
    cfg: dict = {
        "task": "detection",
        "mode": "aip",
        "seed": 0,
        "model": {"name": "tiny_ssd", "kwargs": {"width": 16}},
        "data": {
            "name": "synthetic",
            "num_classes": 2,
            "image_size": 32,
            "train_size": 32,
            "val_size": 8,
            "batch_size": 8,
            "eval_batch_size": 8,
            "num_workers": 0,
            "options": {"max_objects": 1},
        },
        "train": {"teacher_epochs": 1, "lr": 0.01, "log_every": 1},
        "prune": {"target_flops_ratio": 0.6, "intervals": 2, "epochs_between": 1, "finetune_epochs": 1},
        "loss": {"kd": {"weight": 0.5}, "at": {"weight": 100.0}, "adv": {"weight": 0.1}},
        "export": {"formats": []},
        "logging": {"report_to": []},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def _config(path: Path, **overrides: object) -> Path:
    path.write_text(yaml.safe_dump(tiny_detection(**overrides)))
    return path


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _detections(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return load_pruned_detector(run_dir / "model_pruned.pt")(list(IMAGES))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("det")
    config = _config(tmp / "det.yaml", **{"checkpoint.every_n_steps": 3})
    assert main(["--config", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_detection_run_reports_map_per_stage_within_the_flops_target(finished: Path) -> None:
    report = _report(finished)
    assert set(report["teacher"]) == {"params", "flops", "map", "map50"}
    assert [(s["stage"], s["kind"]) for s in report["stages"]] == [(1, "prune"), (2, "prune"), (3, "finetune")]
    assert all(0 <= s["map"] <= s["map50"] <= 100 for s in report["stages"])
    assert report["stages"][-1]["flops"] <= 0.6 * report["teacher"]["flops"]
    assert report["stages"][-1]["params"] < report["teacher"]["params"]
    assert "| mAP | mAP@.5 |" in (finished / "report.md").read_text()


def test_exported_weights_rebuild_the_pruned_detector(finished: Path) -> None:
    payload = torch.load(finished / "model_pruned.pt", weights_only=True)
    detector = load_pruned_detector(finished / "model_pruned.pt")
    assert {k: v.shape for k, v in detector.state_dict().items()} == {
        k: v.shape for k, v in payload["state_dict"].items()
    }
    teacher = torch.load(finished / "teacher.pt", weights_only=True)["state_dict"]
    assert sum(v.numel() for v in detector.state_dict().values()) < sum(v.numel() for v in teacher.values())
    assert len(_detections(finished)) == 2


def test_killed_detection_run_resumes_mid_stage_to_the_unbroken_result(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path / "det.yaml", **{"checkpoint.every_n_steps": 3})
    run_dir = tmp_path / "killed"
    _run_killed_after(monkeypatch, ["--config", str(config), "--out", str(run_dir)], mid_stage=1)
    assert not (run_dir / "report.json").exists()
    assert main(["--resume", str(run_dir)]) == 0
    assert _report(run_dir) == _report(finished)
    resumed = torch.load(run_dir / "model_pruned.pt", weights_only=True)["state_dict"]
    unbroken = torch.load(finished / "model_pruned.pt", weights_only=True)["state_dict"]
    for key, value in unbroken.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_recovery_curve_records_map_after_each_prune_and_epoch(tmp_path: Path) -> None:
    config = _config(tmp_path / "c.yaml", **{"train.eval_each_epoch": True, "prune.intervals": 1})
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    report = _report(tmp_path / "run")
    points = [(p["stage"], p["epoch"]) for p in report["curve"]]
    assert points == [(1, 0), (1, 1), (2, 1)]
    assert report["curve"][-1]["map"] == report["stages"][-1]["map"]
