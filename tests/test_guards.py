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


def test_a_teacher_whose_weights_overflow_stops_before_pruning_naming_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aip.models import create_model

    teacher = create_model("cifar_resnet8", 4)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1e9)  # finite weights whose eval-mode outputs overflow
    path = tmp_path / "big.pt"
    torch.save(teacher.state_dict(), path)
    code, errors, run_dir = _run(tmp_path, capsys, **{"model.teacher_checkpoint": str(path)})
    assert code == 2 and len(errors.splitlines()) == 1
    assert errors.startswith("error: teacher: non-finite outputs in eval mode") and str(path) in errors
    assert not (run_dir / "checkpoints").exists()


def test_teacher_training_whose_eval_outputs_overflow_stops_at_that_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch statistics keep the training loss finite while the weights blow up: the epoch's check catches it."""
    step = torch.optim.SGD.step

    def blow_up(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1e30)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", blow_up)
    code, errors, run_dir = _run(tmp_path, capsys, **{"train.teacher_epochs": 1, "data.train_size": 32})
    assert code == 2 and errors.startswith("error: teacher training, epoch 1: non-finite outputs in eval mode")
    assert not (run_dir / "teacher.pt").exists()


@pytest.mark.parametrize("mode", ["aip", "train"])
def test_a_training_set_smaller_than_one_batch_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """One image per class in an imagefolder tree: with the last partial batch dropped, no step would run."""
    from tests.test_data import _write_tree

    classes = ["a", "b", "c", "d"]
    _write_tree(tmp_path / "images", "train", classes, 1, size=16)
    _write_tree(tmp_path / "images", "val", classes, 1, size=16)
    data = {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 16, "num_classes": 4}
    code, errors, run_dir = _run(tmp_path, capsys, mode=mode, data={**tiny_run()["data"], **data})
    assert code == 2 and len(errors.splitlines()) == 1
    assert "the training set has 4 samples, fewer than one batch (data.batch_size=32)" in errors
    assert not (run_dir / "teacher.pt").exists() and not (run_dir / "model.pt").exists()


def test_user_data_smaller_than_one_batch_is_refused_through_the_api(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    import aip
    from aip.config import ConfigError, config_from_dict
    from aip.models import create_model

    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,)))
    cfg = config_from_dict(tiny_run())
    with pytest.raises(ConfigError, match="the training set has 8 samples, fewer than one batch"):
        aip.run(cfg, teacher=create_model("cifar_resnet8", 4), train_data=data, val_data=data, out=tmp_path / "r")


def test_the_output_check_leaves_every_module_in_the_mode_it_found_it() -> None:
    """A frozen teacher stays in eval mode, also through a view whose own mode differs (a detector's)."""
    from aip.guards import check_outputs

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    model[1].eval()
    view = nn.Sequential(model)  # a new module: in train mode
    check_outputs("teacher", view, torch.randn(2, 3, 8, 8), "cause")
    assert [m.training for m in view.modules()] == [True, True, True, False, True]
