"""A diverging run stops with one `error:` line naming the stage, the step and the loss term, exits 2, and leaves
no checkpoint, teacher file or export that holds NaN or Inf."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from aip import checkpoint as ckpt
from aip.guards import NonFiniteError, check_losses, check_modules, check_state
from aip.train import main
from tests.conftest import tiny_run


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], **overrides) -> tuple[int, str, Path]:
    """Run a tiny config in this process: (exit status, the `error:` lines, the run directory)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**overrides)))
    run_dir = tmp_path / "run"
    code = main(["--config", str(config), "--out", str(run_dir)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, "\n".join(errors), run_dir


def _nothing_saved(run_dir: Path) -> None:
    assert not ckpt.list_checkpoints(run_dir)
    assert not (run_dir / "model_pruned.pt2").exists() and not (run_dir / "report.json").exists()


def test_check_losses_names_every_non_finite_term() -> None:
    check_losses({"loss_ce": torch.tensor(1.5), "loss_kd": torch.tensor(0.0)})
    with pytest.raises(NonFiniteError, match=r"loss_kd = nan, loss = inf") as info:
        check_losses({"loss_ce": torch.tensor(1.5), "loss_kd": torch.tensor(math.nan), "loss": torch.tensor(math.inf)})
    assert "loss_ce" not in str(info.value)


def test_weights_are_checked_before_they_are_written() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    check_modules("x", [model])
    check_state("x", model.state_dict())
    with torch.no_grad():
        model[1].running_var[2] = math.inf
    with pytest.raises(NonFiniteError, match=r"not writing teacher.pt: non-finite weights \(1.running_var\)"):
        check_state("teacher.pt", model.state_dict())
    with pytest.raises(NonFiniteError, match=r"1.running_var"):
        check_modules("checkpoint stage-01", [model])


def test_teacher_training_that_diverges_stops_before_saving_the_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error, run_dir = _run(tmp_path, capsys, **{"train.lr": 10000.0})
    assert code == 2
    assert error.startswith("error: teacher training, epoch 1, step ") and "loss_ce = nan" in error, error
    assert len(error.splitlines()) == 1
    assert not (run_dir / "teacher.pt").exists()
    _nothing_saved(run_dir)


def test_distillation_that_diverges_names_stage_step_and_terms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error, run_dir = _run(tmp_path, capsys, **{"train.teacher_epochs": 0, "loss.kd.weight": 1e9})
    assert code == 2
    assert error.startswith("error: stage 1 (prune), epoch 1, step ") and "loss_kd = " in error, error
    assert len(error.splitlines()) == 1
    _nothing_saved(run_dir)
    teacher = torch.load(run_dir / "teacher.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in teacher.values() if t.is_floating_point())


def test_non_finite_weights_are_never_checkpointed_even_if_the_losses_looked_finite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients can overflow on a finite loss: the check before saving is the last line of defence."""
    monkeypatch.setattr("aip.distill.step.check_losses", lambda *a, **k: None)
    overrides = {"train.teacher_epochs": 0, "train.lr": 10000.0, "prune.intervals": 1, "prune.finetune_epochs": 0}
    code, error, run_dir = _run(tmp_path, capsys, **overrides)
    assert code == 2
    assert error.startswith("error: not writing checkpoint stage-01: non-finite weights ("), error
    _nothing_saved(run_dir)
