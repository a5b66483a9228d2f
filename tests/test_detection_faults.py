"""Fault injection for detection: a tiny detection AIP run killed mid-stage resumes, with `--resume DIR`, to the
unbroken run's report.json rows and pruning log widths, redoing only the steps after its last checkpoint.

As in tests/test_faults.py, a patched function raises `Killed`, a BaseException that no `except Exception` of the
trainer sees, as none sees a SIGKILL. The tiny run (tests/test_detection_run.py): a tiny SSD teacher trained for one
epoch of 4 steps, then 3 stages (prune, prune, finetune) of one 4-step epoch each: 12 distillation steps, global
steps 1-4, 5-8, 9-12, checkpointed at every third step and at each stage end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from aip import checkpoint as ckpt
from aip.tasks.detection.distill import DetectionDistillStep
from aip.train import main
from tests.test_detection_run import tiny_detection

DISTILL_STEPS = 12  # 3 stages x 1 epoch x 4 batches


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so the trainer's `except Exception` clauses let it through."""


def _count(patch: pytest.MonkeyPatch, kill: int | None = None) -> list[int]:
    """Count DetectionDistillStep calls (the returned list's length); raise Killed at the `kill`-th, before it runs."""
    calls: list[int] = []
    step = DetectionDistillStep.__call__

    def counted(self, *args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == kill:
            raise Killed
        return step(self, *args, **kwargs)

    patch.setattr(DetectionDistillStep, "__call__", counted)
    return calls


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _widths(run_dir: Path) -> list:
    return [entry["widths"] for entry in json.loads((run_dir / "pruning_log.json").read_text())]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("detection_faults") / "det.yaml"
    path.write_text(yaml.safe_dump(tiny_detection(**{"checkpoint.every_n_steps": 3})))
    return path


@pytest.fixture(scope="module")
def unbroken(config: Path) -> Path:
    """The reference: the same run, never interrupted."""
    run_dir = config.parent / "unbroken"
    with pytest.MonkeyPatch.context() as patch:
        calls = _count(patch)
        assert main(["--config", str(config), "--out", str(run_dir)]) == 0
    assert len(calls) == DISTILL_STEPS  # the arithmetic above holds
    return run_dir


# kill at distillation call -> (the checkpoint the resume goes on from, the calls it must redo)
KILL_POINTS = {
    "recovery_epoch": (8, (2, 6), DISTILL_STEPS - 6),  # stage 2, its last batch, after the step-6 save
    "finetune_epoch": (11, (3, 9), DISTILL_STEPS - 9),  # stage 3 (finetune), after the step-9 save
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_detection_run_killed_mid_stage_resumes_to_the_unbroken_result(
    point: str, config: Path, unbroken: Path, tmp_path: Path
) -> None:
    kill, (stage, step), redo = KILL_POINTS[point]
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        _count(patch, kill=kill)
        with pytest.raises(Killed):
            main(["--config", str(config), "--out", str(run_dir)])
    GradientState._reset_state()  # the killed run's data loaders never finished their iteration
    AcceleratorState._reset_state()
    assert not (run_dir / "report.json").exists()
    assert ckpt.latest_valid(run_dir) == ckpt.stage_dir(run_dir, stage, step)

    with pytest.MonkeyPatch.context() as patch:
        calls = _count(patch)
        assert main(["--resume", str(run_dir)]) == 0
    assert len(calls) == redo  # only the steps after the checkpoint it went on from

    assert _report(run_dir) == _report(unbroken)  # teacher and stage rows, exactly
    assert _widths(run_dir) == _widths(unbroken)
    resumed = torch.load(run_dir / "model_pruned.pt", weights_only=True)["state_dict"]
    reference = torch.load(unbroken / "model_pruned.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["stage-01", "stage-02", "stage-03"]
