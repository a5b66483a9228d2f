"""`aip.load_pruned`: a run's pruned student rebuilt as the model's own class (registered, `package.module:callable`,
given to `aip.run` as an object, a detector), from the run directory or one stage checkpoint, equal to the export;
paths that hold no finished stage are one line."""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

import aip
from aip import checkpoint as ckpt
from aip.config import ConfigError, config_from_dict
from aip.models.cifar_resnet import CifarResNet
from aip.tasks.detection.export import load_pruned_detector
from aip.train import main
from tests.conftest import IMAGES, exported_outputs, tiny_run
from tests.test_detection_run import tiny_detection

FAST = {"train.teacher_epochs": 1, "prune.intervals": 2, "prune.finetune_epochs": 0, "export.formats": ["pt2"]}

USER_NETS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, width=12):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))
"""


class GivenNet(nn.Module):
    """A network handed to `aip.run` as an object: no config names it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean(dim=(2, 3)))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _numel(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _run(tmp: Path, cfg: dict) -> Path:
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp / "c.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny AIP run of the registered cifar_resnet8: two pruning stages."""
    return _run(tmp_path_factory.mktemp("cls"), tiny_run(**FAST))


def test_a_run_directory_gives_the_final_student_as_its_own_class(finished: Path) -> None:
    rng = torch.get_rng_state()
    model = aip.load_pruned(finished)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random streams are left alone
    assert type(model) is CifarResNet and not model.training
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    report = _report(finished)
    assert _params(model) == report["stages"][-1]["params"] < report["teacher"]["params"]
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), exported_outputs(finished), rtol=1e-5, atol=1e-5)


def test_a_stage_checkpoint_gives_that_stages_student(finished: Path) -> None:
    model = aip.load_pruned(finished / "checkpoints" / "stage-01")
    stages = _report(finished)["stages"]
    assert not model.training
    assert _params(model) == stages[0]["params"] > stages[-1]["params"]


def test_a_checkpoint_without_the_model_record_reads_the_shapes_off_the_data(finished: Path, tmp_path: Path) -> None:
    """Checkpoints written before meta.json kept the model record: the class count and input come from the data."""
    old = tmp_path / "stage-02"
    shutil.copytree(finished / "checkpoints" / "stage-02", old)
    meta = json.loads((old / "meta.json").read_text())
    assert meta.pop("model") == {"num_classes": 4, "example_shape": [1, 3, 16, 16], "given": None}
    (old / "meta.json").write_text(json.dumps(meta))
    ckpt.write_manifest(old)
    with torch.no_grad():
        torch.testing.assert_close(aip.load_pruned(old)(IMAGES), exported_outputs(finished), rtol=1e-5, atol=1e-5)


def test_paths_without_a_finished_stage_are_one_line(finished: Path, tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="neither a run directory"):
        aip.load_pruned(tmp_path)
    _one_line(pytest.raises(ckpt.CheckpointError, aip.load_pruned, tmp_path / "missing"))
    _one_line(pytest.raises(ckpt.CheckpointError, aip.load_pruned, finished / "model_pruned.pt2"))
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(finished / "config.yaml", started / "config.yaml")
    with pytest.raises(ckpt.CheckpointError, match="no finished stage checkpoint") as exc:
        aip.load_pruned(started)
    assert "stopped before its first stage ended" in _one_line(exc)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.yaml").write_text(yaml.safe_dump(tiny_run(mode="train")))
    with pytest.raises(ckpt.CheckpointError, match="a mode train run saves none") as exc:
        aip.load_pruned(trained)
    _one_line(exc)
    damaged = tmp_path / "damaged"
    shutil.copytree(finished, damaged, ignore=shutil.ignore_patterns("tb"))
    for stage in (damaged / "checkpoints").iterdir():
        (stage / "history.json").write_text("[]")
    with pytest.raises(ckpt.CheckpointError, match="damaged") as exc, pytest.warns(UserWarning, match="skipping"):
        aip.load_pruned(damaged)
    _one_line(exc)


@pytest.fixture(scope="module")
def user_acp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """An ACP run of `model.name: <package>.nets:Net`, a class written to a fresh package on sys.path."""
    tmp = tmp_path_factory.mktemp("user")
    package = f"lp_{uuid.uuid4().hex[:8]}"
    (tmp / package).mkdir()
    (tmp / package / "__init__.py").write_text("")
    (tmp / package / "nets.py").write_text(USER_NETS)
    acp = {"holdout_size": 64, "recovery_steps": 2, "calibration_images": 64, "swarm": {"particles": 2}}
    overrides = {**FAST, "mode": "acp", "model.name": f"{package}.nets:Net", "acp": acp, "acp.swarm.iterations": 1}
    sys.path.insert(0, str(tmp))
    try:
        yield _run(tmp, tiny_run(**overrides)), package
    finally:
        sys.path.remove(str(tmp))
        for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[name]


def test_a_user_model_by_import_path_from_an_acp_run(user_acp_run: tuple[Path, str]) -> None:
    run_dir, package = user_acp_run
    model = aip.load_pruned(run_dir)
    assert type(model) is sys.modules[f"{package}.nets"].Net and not model.training
    report = _report(run_dir)
    assert _params(model) == report["stages"][-1]["params"] < report["teacher"]["params"]
    assert model.body[0].out_channels < 12  # ACP's cut really came back
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), exported_outputs(run_dir), rtol=1e-5, atol=1e-5)


def _data(count: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (count,), generator=gen)
    return TensorDataset(patterns[labels] + torch.randn(count, 3, 12, 12, generator=gen), labels)


def test_a_model_given_to_aip_run_needs_it_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    given = GivenNet()
    cfg = config_from_dict(tiny_run(**{**FAST, "prune.intervals": 1, "prune.target_flops_ratio": 0.5}))
    result = aip.run(cfg, teacher=given, train_data=_data(96, 1), val_data=_data(32, 2), out=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"GivenNet.*model=") as exc:
        aip.load_pruned(result.run_dir)
    _one_line(exc)
    before = {k: v.clone() for k, v in given.state_dict().items()}
    model = aip.load_pruned(result.run_dir, model=given)
    assert type(model) is GivenNet and model is not given and not model.training
    assert given.b[0].out_channels == 32 and given.training  # the object passed is left as it was
    assert all(torch.equal(given.state_dict()[k], v) for k, v in before.items())
    assert model.b[0].out_channels < 32
    x = _data(4, 3).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.student.eval()(x))
        torch.testing.assert_close(model(x), torch.export.load(result.run_dir / "model_pruned.pt2").module()(x))


def test_a_detection_run_gives_the_detector_its_export_holds(tmp_path: Path) -> None:
    overrides = {"train.teacher_epochs": 1, "prune.intervals": 1, "prune.finetune_epochs": 0}
    run_dir = _run(tmp_path, tiny_detection(**overrides))
    model = aip.load_pruned(run_dir)
    exported = load_pruned_detector(run_dir / "model_pruned.pt")
    assert type(aip.load_pruned(run_dir / "model_pruned.pt")) is type(exported)
    assert type(model) is type(exported) and not model.training
    assert model.state_dict().keys() == exported.state_dict().keys()
    assert all(torch.equal(t, exported.state_dict()[k]) for k, t in model.state_dict().items())
    teacher = torch.load(run_dir / "teacher.pt", weights_only=True)["state_dict"]
    assert _numel(model.state_dict()) < _numel(teacher)
    images = list(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        got, want = model(images), exported(images)
    for a, b in zip(got, want, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key])
