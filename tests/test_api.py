"""The Python API: `aip.run` on a user's model instance and data sets in every mode, the user's model untouched,
the run-directory rules, the example script, and the scalars every run logs through Accelerate's trackers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import LoggerType
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import aip
from aip.api import Result, data_bundle
from aip.config import TRACKERS, Config, ConfigError, config_from_dict
from aip.images import DataError
from aip.rundir import RunDirError
from aip.session import Session
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent
CLASSES = 3


class UserNet(nn.Module):
    """A user's own network: two conv stages and a head, nothing aip knows by name."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean(dim=(2, 3)))


def _data(count: int, seed: int) -> TensorDataset:
    """(image, label) pairs of 12x12 images: a per-class pattern plus noise, so the classes can be learnt."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, CLASSES, (count,), generator=gen)
    return TensorDataset(patterns[labels] + torch.randn(count, 3, 12, 12, generator=gen), labels)


def _cfg(**overrides) -> Config:
    base = {"prune.intervals": 1, "prune.target_flops_ratio": 0.5, "export.formats": ["pt2"], **overrides}
    return config_from_dict(tiny_run(**base))


@pytest.fixture(scope="module")
def user_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[UserNet, dict, Result]:
    """One API run in mode aip on a user's model and data; the model's state before the run is kept to compare."""
    torch.manual_seed(0)
    model = UserNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("api") / "run"
    result = aip.run(_cfg(), teacher=model, train_data=_data(192, 1), val_data=_data(96, 2), out=out)
    return model, before, result


def test_run_prunes_a_copy_and_leaves_the_users_model_alone(user_run) -> None:
    model, before, result = user_run
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.b[0].out_channels == 32 and model.a[0].out_channels == 16 and model.training
    assert isinstance(result.student, UserNet) and result.student is not model
    assert result.student.b[0].out_channels < 32  # channels really went
    assert result.report == json.loads((result.run_dir / "report.json").read_text())
    assert [s["kind"] for s in result.report["stages"]] == ["prune", "finetune"]
    assert result.report["stages"][-1]["flops"] <= 0.5 * result.report["teacher"]["flops"]
    with torch.no_grad():  # the student returned is the one the last row measured and the export holds
        x = _data(4, 3).tensors[0]
        exported = torch.export.load(result.run_dir / "model_pruned.pt2").module()(x)
        torch.testing.assert_close(result.student.eval()(x), exported)


def test_tensorboard_events_hold_every_loss_term_lr_accuracy_and_cost(user_run) -> None:
    _, _, result = user_run
    events = [p for p in (result.run_dir / "tb").rglob("events.out.tfevents.*")]
    assert events, "no TensorBoard event file under tb/"
    tags: set[str] = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in ("loss", "loss_ce", "loss_kd", "loss_at", "loss_adv", "loss_d", "lr"):
        assert f"train/{tag}" in tags, tag
    assert {"stage/top1", "stage/top5", "stage/flops", "stage/params"} <= tags


def test_an_existing_run_directory_needs_resume_or_overwrite(user_run) -> None:
    model, _, result = user_run
    data = {"train_data": _data(192, 1), "val_data": _data(96, 2)}
    with pytest.raises(RunDirError):
        aip.run(_cfg(), teacher=model, out=result.run_dir, **data)
    again = aip.run(_cfg(), teacher=model, out=result.run_dir, resume="auto", **data)  # finished: trains nothing
    assert again.report == result.report


class Killed(Exception):
    """Stands for SIGKILL right after a mid-stage checkpoint."""


def test_a_killed_api_run_resumes_to_the_same_table(user_run, tmp_path: Path, monkeypatch) -> None:
    _, _, reference = user_run
    torch.manual_seed(0)
    model = UserNet()  # the same weights as the reference run's teacher
    data = {"train_data": _data(192, 1), "val_data": _data(96, 2)}
    cfg = _cfg(**{"checkpoint.every_n_steps": 3})  # a neutral key: the result is the reference's
    save = Session.save_checkpoint

    def save_then_die(self, stage, history, step=None, partial=None):
        save(self, stage, history, step, partial)
        if partial is not None:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Session, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            aip.run(cfg, teacher=model, out=tmp_path / "r", **data)
    GradientState._reset_state()  # the killed run's data loaders never finished their iteration
    AcceleratorState._reset_state()
    resumed = aip.run(cfg, teacher=model, out=tmp_path / "r", resume="auto", **data)
    assert resumed.report == reference.report


def test_train_and_eval_modes_take_the_users_model(tmp_path: Path) -> None:
    model = UserNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"train_data": _data(192, 1), "val_data": _data(96, 2)}
    trained = aip.run(_cfg(mode="train", **{"train.epochs": 2}), teacher=model, out=tmp_path / "t", **data)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert trained.report["teacher"]["top1"] > 60.0  # 3 classes: chance is 33%
    measured = aip.run(_cfg(mode="eval"), teacher=trained.student, out=tmp_path / "e", **data)
    assert measured.report == trained.report


def test_acp_mode_takes_the_users_model(tmp_path: Path) -> None:
    swarm = {"particles": 2, "iterations": 1}
    acp = {"holdout_size": 48, "recovery_steps": 2, "calibration_images": 48, "swarm": swarm}
    cfg = _cfg(mode="acp", acp=acp)
    result = aip.run(cfg, teacher=UserNet(), train_data=_data(192, 1), val_data=_data(96, 2), out=tmp_path / "a")
    assert [s["kind"] for s in result.report["stages"]] == ["acp", "finetune"]  # one interval, then the fine-tune
    assert result.report["stages"][0]["flops"] <= 0.5 * result.report["teacher"]["flops"]


def test_one_data_set_alone_or_a_model_that_does_not_fit_the_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_data and val_data"):
        aip.run(_cfg(), teacher=UserNet(), train_data=_data(8, 1), out=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"teacher: returns 3 classes, the data has 4 \(data.num_classes"):
        aip.run(_cfg(), teacher=UserNet(), out=tmp_path / "y")  # the config's synthetic data: 4 classes
    assert not (tmp_path / "y" / "config.yaml").exists()  # refused before the run directory held a run


def test_report_to_knows_accelerates_trackers_and_names_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}
    with pytest.raises(ConfigError, match=r"logging.report_to\[0\]: 'tensorbored' is not allowed"):
        _cfg(**{"logging.report_to": ["tensorbored"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.report_to: comet_ml needs its package: pip install comet-ml"):
        aip.run(_cfg(**{"logging.report_to": ["comet_ml"]}), out="unused")


def test_the_example_script_prunes_and_prints_the_stage_table(tmp_path: Path) -> None:
    script = REPO / "examples" / "prune_my_model.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "mine")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "mine" / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["prune", "prune", "finetune"]
    assert report["stages"][-1]["flops"] <= 0.4 * report["teacher"]["flops"]
    assert report["stages"][-1]["top1"] > 50.0  # 4 classes: chance is 25%


@pytest.mark.slow
def test_the_example_runs_the_same_under_accelerate_launch(tmp_path: Path) -> None:
    """Two processes (gloo on the CPU) call `aip.run` alike: rank 0 prints the table; the weights are rank 0's."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    script = [str(REPO / "examples" / "prune_my_model.py"), "--out", str(tmp_path / "mine")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, *script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"teacher"')]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads((tmp_path / "mine" / "report.json").read_text())


class Sized(Dataset):
    """`count` (image, label) pairs made when read: 12x12 images, 16x16 at the indices in `odd`."""

    def __init__(self, count: int, odd: tuple[int, ...] = ()) -> None:
        self.count, self.odd = count, odd

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        size = 16 if index in self.odd else 12
        return torch.full((3, size, size), index / self.count), index % CLASSES


def test_images_of_mixed_sizes_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        aip.run(_cfg(), teacher=UserNet(), train_data=Sized(64, odd=(37,)), val_data=Sized(32), out=tmp_path / "a")
    assert str(info.value).startswith("train_data: sample 37 is a (3, 16, 16) image, sample 0 a (3, 12, 12) one")
    with pytest.raises(ConfigError, match=r"^val_data: sample 31 is a \(3, 16, 16\) image"):
        aip.run(_cfg(), teacher=UserNet(), train_data=Sized(64), val_data=Sized(32, odd=(31,)), out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_odd_image_past_the_checked_ones_stops_as_it_is_read(tmp_path: Path) -> None:
    """A large set is checked on an even spread of its samples; an unchecked odd image is one line when read."""
    bundle = data_bundle(Sized(5000, odd=(10,)), Sized(32), CLASSES, CLASSES)  # sample 10 is not in the spread
    assert bundle.input_shape == (3, 12, 12) and len(bundle.train) == 5000
    loader = DataLoader(Subset(bundle.train, range(8, 12)), batch_size=4, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert str(info.value).startswith("train_data: sample 10 is a (3, 16, 16) image, sample 0 a (3, 12, 12) one")
    assert "\n" not in str(info.value)


def test_a_config_changed_after_loading_is_checked_again(tmp_path: Path) -> None:
    data = {"train_data": _data(64, 1), "val_data": _data(32, 2)}
    changed = _cfg()
    changed.prune.target_flops_ratio = "half"
    with pytest.raises(ConfigError, match=r"^prune.target_flops_ratio: expected a number or null, got 'half'$"):
        aip.run(changed, teacher=UserNet(), out=tmp_path / "a", **data)
    changed = _cfg()
    changed.train.lr = float("nan")
    with pytest.raises(ConfigError, match="^train.lr: must be a finite number, got nan$"):
        aip.run(changed, teacher=UserNet(), out=tmp_path / "b", **data)
    changed = _cfg()
    changed.disc.hidden = [16, 0]
    with pytest.raises(ConfigError, match=r"^disc.hidden: a non-empty list of positive widths, got \[16, 0\]$"):
        aip.run(changed, teacher=UserNet(), out=tmp_path / "c", **data)
    assert not any((tmp_path / name).exists() for name in "abc")
