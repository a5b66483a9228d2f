"""ACP on detectors: `mode: acp` on a tiny SSD searches per-group widths by held-out mAP@.5, reaches the FLOPs target,
reports mAP per stage and keeps the head layout (the pruned detector still detects and trains, and every removal step
keeps the prunable view's function); the fitness is the held-out mAP@.5, high for the trained detector and low for a
heavy cut, and the same on every call."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from aip.config import config_from_dict
from aip.prune.equivalence import replay_deviation
from aip.prune.pruner import ChannelPruner
from aip.search.fitness import recovered_score, split_search_data
from aip.tasks import task_for
from aip.tasks.detection.export import load_pruned_detector
from aip.tasks.detection.metrics import evaluate_detector
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.prunable import PrunableDetector, head_layers
from aip.train import main
from tests.test_detection_run import tiny_detection

IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
ACP = {
    "mode": "acp",
    "train.teacher_epochs": 6,
    "data.train_size": 96,
    "data.val_size": 16,
    "acp": {
        "holdout_size": 16,
        "recovery_steps": 3,
        "calibration_images": 32,
        "eps": 0.25,
        "min_samples": 3,
        "swarm": {"particles": 3, "iterations": 1},
    },
}


def _teacher(run_dir: Path) -> torch.nn.Module:
    """The run's trained teacher detector (tiny SSD, 2 object classes, 32 px, width 16), in eval mode."""
    detector = create_detector("tiny_ssd", 3, 32, width=16)
    detector.load_state_dict(torch.load(run_dir / "teacher.pt", weights_only=True)["state_dict"])
    return detector.eval()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("detacp")
    config = tmp / "acp.yaml"
    config.write_text(yaml.safe_dump(tiny_detection(**ACP)))
    assert main(["--config", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_acp_detection_run_meets_the_flops_target_and_reports_map(finished: Path) -> None:
    report = json.loads((finished / "report.json").read_text())
    assert set(report["teacher"]) == {"params", "flops", "map", "map50"}
    assert [s["kind"] for s in report["stages"]] == ["acp", "acp", "finetune"]  # 2 intervals, then the fine-tune
    stage = report["stages"][-1]
    assert 0 <= stage["map"] <= stage["map50"] <= 100
    # Within the budget; the clustering sets how far under it (0.26 of the FLOPs here), where the swarm starts.
    assert 0.2 < stage["flops"] / report["teacher"]["flops"] <= 0.6
    assert "| mAP | mAP@.5 |" in (finished / "report.md").read_text()
    swarm = json.loads((finished / "acp_swarm.json").read_text())
    assert swarm["iteration"] == 1 and len(swarm["positions"]) == 3
    log = json.loads((finished / "pruning_log.json").read_text())
    assert [e["criterion"] for e in log] == ["acp", "acp"] and log[-1]["widths"] == log[0]["searched_widths"]


def test_acp_pruned_detector_keeps_its_heads_and_still_detects_and_trains(finished: Path) -> None:
    teacher, pruned = _teacher(finished), load_pruned_detector(finished / "model_pruned.pt")
    assert [m.weight.shape[0] for m in head_layers(pruned)] == [m.weight.shape[0] for m in head_layers(teacher)]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in teacher.parameters())
    with torch.no_grad():
        detections = pruned(list(IMAGES))
    assert len(detections) == 2 and all(d["boxes"].shape[-1] == 4 for d in detections)
    pruned.train()
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 24.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    losses = pruned(list(IMAGES), targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    view = PrunableDetector(teacher).eval()
    names = {m: n for n, m in view.named_modules()}
    history = torch.load(finished / "model_pruned.pt", weights_only=True)["history"]
    _, deviation = replay_deviation(view, history, view.batch([IMAGES[0]]), [names[m] for m in head_layers(teacher)])
    assert deviation < 1e-4


def test_fitness_is_held_out_map50_high_unpruned_low_heavily_cut(finished: Path) -> None:
    cfg = config_from_dict(tiny_detection(**ACP))
    task = task_for(cfg)
    bundle = task.build_data(cfg)
    data = split_search_data(bundle, cfg.acp.holdout_size, cfg.seed, task)
    teacher, example = _teacher(finished), task.example(bundle)
    pruner = ChannelPruner(*task.prunable(copy.deepcopy(teacher), example))
    whole = dict(pruner.widths())
    thin = {name: pruner.min_width(name) for name in whole}
    state = torch.get_rng_state()
    unpruned, cut = (recovered_score(cfg, teacher, w, example, data, task) for w in (whole, thin))
    assert torch.equal(torch.get_rng_state(), state)  # seeded on its own: the run's random stream is untouched
    assert recovered_score(cfg, teacher, thin, example, data, task) == cut  # the same on any process, any order
    holdout = DataLoader(data.holdout, batch_size=8, collate_fn=task.collate)
    measured = evaluate_detector(teacher, holdout, "cpu")
    assert unpruned > measured["map"] + 20 and abs(unpruned - measured["map50"]) < 10  # mAP@.5, not mAP@[.5:.95]
    assert unpruned > cut + 40


def test_restart_from_the_saved_teacher_scores_the_candidates_as_the_unbroken_run(
    finished: Path, tmp_path: Path
) -> None:
    """The unbroken run searched after training its teacher (the training set's augmentation at a later epoch), the
    restart after loading it: the candidates must still train on the same images and score the same."""
    run_dir = tmp_path / "restart"
    run_dir.mkdir()
    for name in ("config.yaml", "teacher.pt"):
        shutil.copy2(finished / name, run_dir / name)
    assert main(["--resume", str(run_dir)]) == 0
    for name, key in (("acp_swarm.json", "history"), ("report.json", "stages")):
        restarted, unbroken = (json.loads((d / name).read_text())[key] for d in (run_dir, finished))
        assert restarted == unbroken


def test_a_held_out_part_that_leaves_less_than_a_batch_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = {**ACP, "train.teacher_epochs": 1, "data.train_size": 16, "acp.holdout_size": 12}
    config = tmp_path / "acp.yaml"
    config.write_text(yaml.safe_dump(tiny_detection(**overrides)))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: acp.holdout_size: 12 leaves 4 training images, fewer than data.batch_size=8")
