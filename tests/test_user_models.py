"""Your own model class by import path (`package.module:callable`): building, kwargs, errors, and a full run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from aip import checkpoint as ckpt
from aip.checks import check_names
from aip.config import ConfigError, config_from_dict, load_config
from aip.models import check_model_name, create_model
from aip.train import main
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent

NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Takes num_classes: aip passes the data's class count."""

    def __init__(self, num_classes, width=8):
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def fixed(classes=10, width=4):
    """No num_classes argument: the width comes from model.kwargs only."""
    return TinyNet(classes, width)


def broken(**kwargs):
    raise RuntimeError("this constructor is broken")


def not_a_module():
    return 42


def pair(num_classes):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)

        def forward(self, x):
            return self.fc(x.mean((2, 3))), x

    return Pair()
'''


@pytest.fixture
def user_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh package `<unique>.nets` in the working directory (not on sys.path), removed from sys.modules after."""
    name = f"usernets_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[mod]


EXAMPLE = torch.randn(1, 3, 16, 16)


def test_class_taking_num_classes_gets_it_and_the_kwargs(user_pkg: str) -> None:
    model = create_model(f"{user_pkg}.nets:TinyNet", 5, 3, {"width": 6}, EXAMPLE)
    assert type(model).__name__ == "TinyNet" and model.width == 6
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert str(Path.cwd()) not in sys.path  # imported from the working directory without leaving it on sys.path


def test_callable_without_num_classes_takes_the_width_from_kwargs(user_pkg: str) -> None:
    model = create_model(f"{user_pkg}.nets:fixed", 7, 3, {"classes": 7, "width": 2}, EXAMPLE)
    assert model(EXAMPLE).shape == (1, 7) and model.width == 2


@pytest.mark.parametrize(
    ("attr", "kwargs", "fragment"),
    [
        ("fixed", {}, "outputs shape (1, 10) for one image, but the data has 4 classes"),
        ("TinyNet", {"num_classes": 3}, "outputs shape (1, 3) for one image, but the data has 4 classes"),
        ("pair", {}, "returns a tuple; it must return a tensor of logits"),
        ("broken", {}, "raised RuntimeError: this constructor is broken"),
        ("not_a_module", {}, "returned an object of type int, not a torch.nn.Module"),
        ("missing", {}, "has no attribute 'missing'"),
        ("TinyNet", {"depth": 3}, "raised TypeError"),
    ],
)
def test_errors_are_one_line_naming_model_name(user_pkg: str, attr: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_model(f"{user_pkg}.nets:{attr}", 4, 3, kwargs, EXAMPLE)
    message = str(info.value)
    assert message.startswith("model.name: ") and fragment in message and "\n" not in message, message


def test_an_explicit_num_classes_in_kwargs_wins(user_pkg: str) -> None:
    model = create_model(f"{user_pkg}.nets:TinyNet", 4, 3, {"num_classes": 4, "width": 3})
    assert model.fc.out_features == 4


def test_a_wrong_input_shape_is_reported_by_the_probe(user_pkg: str) -> None:
    with pytest.raises(ConfigError, match=r"fails on one input of the data's shape \(1, 28, 28\)"):
        create_model(f"{user_pkg}.nets:TinyNet", 10, 1, {}, torch.randn(1, 1, 28, 28))


def test_config_validation_resolves_the_import_path(user_pkg: str) -> None:
    check_model_name(f"{user_pkg}.nets:TinyNet")
    with pytest.raises(ConfigError, match=r"model.name: cannot import 'no_such_pkg.nets'.*ModuleNotFoundError"):
        check_names(config_from_dict({"model": {"name": "no_such_pkg.nets:Net"}}))
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        check_names(config_from_dict({"model": {"name": f"{user_pkg}.nets:Nope"}}))
    with pytest.raises(ConfigError, match="not of the form package.module:callable"):
        check_names(config_from_dict({"model": {"name": f"{user_pkg}.nets:"}}))


def test_model_kwargs_and_rename_are_typed_mappings(user_pkg: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": f"{user_pkg}.nets:TinyNet"}}))
    cfg = load_config(path, ["model.kwargs.width=12", "model.checkpoint_rename={'a.': 'b.'}"])
    assert cfg.model.kwargs == {"width": 12} and cfg.model.checkpoint_rename == {"a.": "b."}
    with pytest.raises(ConfigError, match="model.kwargs: expected a mapping of a string to any value"):
        load_config(path, ["model.kwargs=[1, 2]"])
    with pytest.raises(ConfigError, match=r"model.checkpoint_rename.a.: expected a string, got 3"):
        load_config(path, ["model.checkpoint_rename={'a.': 3}"])
    with pytest.raises(ConfigError, match="model.kwargs: only used with model.name: package.module:callable"):
        check_names(config_from_dict({"model": {"name": "cifar_resnet8", "kwargs": {"width": 2}}}))


def test_cli_imports_the_model_from_the_working_directory(user_pkg: str, tmp_path: Path) -> None:
    """`python aip/train.py` does not put the working directory on sys.path; aip adds it while importing."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**{"model.name": f"{user_pkg}.nets:fixed"})))
    done = subprocess.run(
        [sys.executable, str(REPO / "aip" / "train.py"), "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == (
        f"error: model.name: '{user_pkg}.nets:fixed' outputs shape (1, 10) for one image, but the data has 4 "
        "classes; give the width in model.kwargs or take a num_classes argument"
    )


@pytest.mark.slow
def test_aip_run_with_a_user_model_and_a_data_parallel_checkpoint_then_resume(user_pkg: str, tmp_path: Path) -> None:
    """A teacher of your own class saved from DataParallel (`module.` keys) prunes, and resumes to the same table."""
    name = f"{user_pkg}.nets:TinyNet"
    trained = tmp_path / "trained"
    overrides = {"model.name": name, "model.kwargs": {"width": 8}}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_run(mode="train", **overrides, **{"train.epochs": 2})))
    assert main(["--config", str(config), "--out", str(trained)]) == 0
    state = torch.load(trained / "model.pt", weights_only=True)["state_dict"]
    wrapped = tmp_path / "teacher_dp.pth"
    torch.save({"epoch": 2, "model": {f"module.{k}": v for k, v in state.items()}}, wrapped)

    config = tmp_path / "aip.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**overrides, **{"model.teacher_checkpoint": str(wrapped)})))
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["teacher"] == json.loads((trained / "report.json").read_text())["teacher"]
    assert report["stages"][-1]["flops"] <= 0.6 * report["teacher"]["flops"]

    interrupted = tmp_path / "interrupted"
    shutil.copytree(run_dir, interrupted)
    for path in ckpt.list_checkpoints(interrupted)[1:]:
        shutil.rmtree(path)
    (interrupted / "report.json").unlink()
    assert main(["--resume", str(interrupted)]) == 0
    assert json.loads((interrupted / "report.json").read_text()) == report


@pytest.mark.slow
def test_two_processes_import_the_model_from_the_working_directory(user_pkg: str, tmp_path: Path) -> None:
    """Under `accelerate launch` every process imports the class and reads the same `module.`-prefixed file."""
    model = create_model(f"{user_pkg}.nets:TinyNet", 4, 3, {"width": 4})
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    overrides = {"model.name": f"{user_pkg}.nets:TinyNet", "model.kwargs": {"width": 4}}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(tiny_run(mode="eval", **overrides, **{"model.teacher_checkpoint": "w.pth"})))
    assert main(["--config", str(config), "--out", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    args = [str(REPO / "aip" / "train.py"), "--config", str(config), "--out", str(tmp_path / "two")]
    done = subprocess.run([*launch, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert one == two and one["stages"] == []
