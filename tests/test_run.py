"""End-to-end runs of the trainer on tiny models and synthetic data (CPU, seconds each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aip import checkpoint as ckpt
from aip.config import load_config
from aip.data import build_data
from aip.train import main
from tests.conftest import exported_outputs, tiny_run

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run(**overrides)))
    return path


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny AIP run (teacher trained first) shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("run")
    run_dir = tmp / "run"
    assert main(["--config", str(_config(tmp)), "--out", str(run_dir)]) == 0
    return run_dir


def test_run_writes_everything_and_meets_the_flops_target(finished_run: Path) -> None:
    for name in ("config.yaml", "report.json", "report.md", "teacher.pt", "model_pruned.pt2", "pruning_log.json"):
        assert (finished_run / name).is_file(), name
    assert any((finished_run / "tb").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(finished_run)] == ["stage-01", "stage-02", "stage-03"]
    report = _report(finished_run)
    assert [s["stage"] for s in report["stages"]] == [1, 2, 3]
    assert [s["kind"] for s in report["stages"]] == ["prune", "prune", "finetune"]
    final = report["stages"][-1]
    ratio = final["flops"] / report["teacher"]["flops"]
    assert 0.6 * 0.95 <= ratio <= 0.6
    assert final["params"] < report["teacher"]["params"]
    log = json.loads((finished_run / "pruning_log.json").read_text())
    assert [round(e["target_ratio"], 4) for e in log] == [round(0.6**0.5, 4), 0.6]


def test_teacher_and_student_beat_chance_clearly(finished_run: Path) -> None:
    report = _report(finished_run)
    assert report["teacher"]["top1"] > 50.0  # 4 classes: chance is 25%
    assert report["stages"][-1]["top1"] > 50.0


def test_exported_model_runs_without_aip(finished_run: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['aip'] = None\n"  # any import of aip now fails
        "import torch\n"
        f"m = torch.export.load({str(finished_run / 'model_pruned.pt2')!r}).module()\n"
        "out = m(torch.randn(3, 3, 16, 16))\n"
        "assert out.shape == (3, 4), out.shape\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_exported_model_scores_what_the_report_says(finished_run: Path) -> None:
    """The export holds the student the last row evaluated: its top-1 on the validation set is that row's."""
    val = build_data(load_config(finished_run / "config.yaml").data).val
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        correct = int((torch.export.load(finished_run / "model_pruned.pt2").module()(images).argmax(1) == labels).sum())
    assert 100.0 * correct / len(labels) == _report(finished_run)["stages"][-1]["top1"]


def test_resume_from_a_stage_checkpoint_gives_the_same_table(finished_run: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"
    shutil.copytree(finished_run, interrupted)
    for path in ckpt.list_checkpoints(interrupted)[1:]:  # as if the run had died during stage 2
        shutil.rmtree(path)
    for name in ("report.json", "report.md", "model_pruned.pt2"):
        (interrupted / name).unlink()
    assert main(["--resume", str(interrupted)]) == 0
    assert _report(interrupted) == _report(finished_run)
    assert torch.equal(exported_outputs(interrupted), exported_outputs(finished_run))


def test_resume_auto_finds_the_run_and_skips_a_damaged_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "auto"
    shutil.copytree(finished_run, run_dir)
    for name in ("report.json", "model_pruned.pt2"):
        (run_dir / name).unlink()
    newest = ckpt.list_checkpoints(run_dir)[-1]
    (newest / "history.json").write_text("[]")  # damaged: no longer matches its manifest
    with pytest.warns(UserWarning, match="stage-03"):
        assert main(["--config", str(run_dir / "config.yaml"), "--resume", "auto", "--out", str(run_dir)]) == 0
    assert _report(run_dir) == _report(finished_run)
    assert torch.equal(exported_outputs(run_dir), exported_outputs(finished_run))


def test_branch_from_a_stage_with_a_new_target(finished_run: Path, tmp_path: Path) -> None:
    branch = tmp_path / "branch"
    config = _config(tmp_path, **{"prune.target_flops_ratio": 0.4})
    stage1 = ckpt.stage_dir(finished_run, 1)
    assert main(["--config", str(config), "--from-stage", str(stage1), "--out", str(branch)]) == 0
    report = _report(branch)
    assert report["stages"][0] == _report(finished_run)["stages"][0]
    assert 0.4 * 0.95 <= report["stages"][-1]["flops"] / report["teacher"]["flops"] <= 0.4
    assert (branch / "teacher.pt").is_file()


def test_train_mode_learns_and_its_weights_serve_as_teacher(tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    config = _config(tmp_path, mode="train", **{"train.epochs": 2})
    assert main(["--config", str(config), "--out", str(run_dir)]) == 0
    assert _report(run_dir)["teacher"]["top1"] > 50.0
    assert _report(run_dir)["stages"] == []
    out = tmp_path / "from_teacher"
    overrides = [f"model.teacher_checkpoint={run_dir / 'model.pt'}", "prune.intervals=1", "prune.finetune_epochs=0"]
    assert main(["--config", str(config), "--set", "mode=aip", *overrides, "--out", str(out)]) == 0
    assert not (out / "teacher.pt").exists()  # the given teacher was used, none trained
    assert _report(out)["teacher"] == _report(run_dir)["teacher"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "prune.target_flops_ratio=1.5"], "prune.target_flops_ratio"),
        (["--set", "data.name=cifar10", "data.root=/nonexistent"], "data.root"),
        (["--set", "model.name=resnet9000"], "model.name"),
        (["--set", "prune.criterion=nope"], "prune.criterion"),
        (["--set", "optim.lr=1"], "unknown key 'optim'"),
    ],
)
def test_cli_bad_config_exits_2_with_one_error_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    cmd = [sys.executable, str(REPO / "aip" / "train.py"), "--config", str(_config(tmp_path)), *args]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started
