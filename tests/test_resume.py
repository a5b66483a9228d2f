"""Exact resume: a run killed anywhere (mid-stage, in ACP's recovery, between teacher.pt and the first checkpoint)
goes on to the report and the exported model of an unbroken run; mid-stage checkpoints count optimizer steps and a
resumed epoch skips the batches already seen by index, without loading them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from aip import checkpoint as ckpt
from aip.seeding import SeededBatches
from aip.session import Session
from aip.train import main
from tests.conftest import exported_outputs, tiny_run

ACP = {
    "mode": "acp",
    "acp": {
        "holdout_size": 64,
        "recovery_steps": 3,
        "calibration_images": 64,
        "swarm": {"particles": 2, "iterations": 1},
    },
    "prune.finetune_epochs": 2,
}


class Killed(Exception):
    """Stands for SIGKILL: raised right after a checkpoint was committed."""


def _config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_run(**overrides)))
    return path


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert _report(run_dir) == _report(reference)
    torch.testing.assert_close(exported_outputs(run_dir), exported_outputs(reference), rtol=0, atol=0)


def _run_killed_after(monkeypatch: pytest.MonkeyPatch, argv: list[str], mid_stage: int) -> None:
    """Run `argv` in this process and stop it (as if killed) right after the `mid_stage`-th mid-stage checkpoint."""
    save, seen = Session.save_checkpoint, []

    def save_then_die(self, stage, pruner, step=None, partial=None):
        save(self, stage, pruner, step, partial)
        if partial is not None:
            seen.append(step)
            if len(seen) == mid_stage:
                raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Session, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            main(argv)
    GradientState._reset_state()  # the killed run's data loaders never finished their iteration
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    config = _config(tmp / "teacher.yaml", mode="train", **{"train.epochs": 2})
    assert main(["--config", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "model.pt"


@pytest.fixture(scope="module")
def acp_reference(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An unbroken ACP run with mid-stage checkpoints: (its config, its run directory)."""
    tmp = tmp_path_factory.mktemp("acp")
    overrides = {**ACP, "model.teacher_checkpoint": str(teacher), "checkpoint.every_n_steps": 3}
    config = _config(tmp / "acp.yaml", **overrides)
    assert main(["--config", str(config), "--out", str(tmp / "reference")]) == 0
    return config, tmp / "reference"


@pytest.mark.parametrize(
    ("kill_at", "newest_name"),
    [
        (2, "stage-01-step-00000006"),  # inside the first interval: the second cut reads the searched widths back
        (3, "stage-02-step-00000009"),  # inside the second interval: both cuts replayed from the history
    ],
)
def test_killed_acp_run_resumes_mid_stage_to_the_unbroken_result(
    acp_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at: int, newest_name: str
) -> None:
    config, reference = acp_reference
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    for name in ("config.yaml", "acp_swarm.json"):  # killed after its search: the restart reads the swarm back
        shutil.copy2(reference / name, run_dir / name)
    _run_killed_after(monkeypatch, ["--resume", str(run_dir)], mid_stage=kill_at)
    newest = ckpt.latest_valid(run_dir)
    assert newest is not None and newest.name == newest_name  # 8 batches an epoch, a checkpoint every 3 steps
    assert not (run_dir / "report.json").exists()
    assert main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)
    log, want = (json.loads((d / "pruning_log.json").read_text()) for d in (run_dir, reference))
    assert [e["widths"] for e in log] == [e["widths"] for e in want]
    assert ["search_seconds" in e for e in log] == [True, False]  # searched once: the run state kept its widths


def test_finished_acp_run_resumed_exports_the_recovered_student(
    acp_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    _, reference = acp_reference
    run_dir = tmp_path / "finished"
    shutil.copytree(reference, run_dir)
    for name in ("report.json", "report.md", "model_pruned.pt2"):
        (run_dir / name).unlink()
    assert main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)


def test_restart_after_the_teacher_was_saved_matches_the_unbroken_run(tmp_path: Path) -> None:
    """Killed after teacher.pt, before the first stage checkpoint: the restart loads the teacher instead of training
    it, and must still build the same discriminator and calibrate on the same batches."""
    reference = tmp_path / "reference"
    overrides = {
        "train.teacher_epochs": 1,
        "prune.criterion": "taylor",
        "prune.intervals": 1,
        "prune.finetune_epochs": 0,
    }
    config = _config(tmp_path / "c.yaml", **overrides)
    assert main(["--config", str(config), "--out", str(reference)]) == 0
    run_dir = tmp_path / "restarted"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("checkpoints", "tb", "report*", "*.pt2"))
    (run_dir / "pruning_log.json").unlink()
    assert (run_dir / "teacher.pt").is_file()
    assert main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)


def test_checkpoints_count_optimizer_steps_and_resume_skips_seen_batches_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 2 micro-batches per optimizer step, `every_n_steps: 3` checkpoints every 6 batches; the resumed epoch
    fetches exactly the batches the unbroken run fetched after that point, none of those before it."""
    fetched: list[tuple[int, tuple[int, ...]]] = []
    getitems = SeededBatches.__getitems__

    def recording(self, indices):
        fetched.append((self.seed, tuple(indices)))
        return getitems(self, indices)

    monkeypatch.setattr(SeededBatches, "__getitems__", recording)
    overrides = {
        "train.teacher_epochs": 1,
        "train.grad_accum_steps": 2,
        "checkpoint.every_n_steps": 3,
        "prune.intervals": 1,
        "prune.epochs_between": 2,
        "prune.finetune_epochs": 0,
    }
    config = _config(tmp_path / "c.yaml", **overrides)
    reference = tmp_path / "reference"
    assert main(["--config", str(config), "--out", str(reference)]) == 0
    unbroken = list(fetched)

    run_dir = tmp_path / "killed"
    _run_killed_after(monkeypatch, ["--config", str(config), "--out", str(run_dir)], mid_stage=2)
    newest = ckpt.latest_valid(run_dir)
    meta = json.loads((newest / "meta.json").read_text())
    assert newest.name == "stage-01-step-00000006" and meta["state"]["global_step"] == 6
    assert meta["partial"] == {"stage": 1, "epoch": 1, "batch": 4}  # 8 batches per epoch: 6 steps = 12 batches

    monkeypatch.setattr(SeededBatches, "__getitems__", recording)
    fetched.clear()
    assert main(["--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)
    epoch_seed = (0 * 100_003 + 1 * 1_009 + 1) % 2**32  # Session.seed(stage 1, epoch 1)
    first = next(i for i, (seed, _) in enumerate(unbroken) if seed == epoch_seed)
    assert fetched == unbroken[first + 4 :]
