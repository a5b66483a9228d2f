"""`model.pretrained` and `model.pretrained_file`: weights from a local file as the library loads its own, the head
replaced for another class count, the pretrained preprocessing where the config leaves it unset, the teacher taken
as it is or fine-tuned, and one-line errors offline and for models without library weights. Nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image

from aip.checks import check_names
from aip.config import ConfigError, config_from_dict
from aip.methods.train import TEACHER_FILE, load_teacher
from aip.models import create_model
from aip.models.pretrained import pretrained_data
from aip.session import Session
from aip.tasks.classification import ClassificationTask
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parents[1]
TINY = "timm:test_resnet"  # timm's test model: 0.5 mean/std, 160-pixel crops at crop_pct 0.95, 1000 classes
TV = "torchvision:resnet18"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network and empty library caches: the Hugging Face hub offline, torch.hub's downloads failing."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return cache


def _timm_file(tmp_path: Path, classes: int = 1000) -> tuple[Path, dict[str, torch.Tensor]]:
    """A test_resnet weights file of `classes` outputs, and its state dict."""
    torch.manual_seed(1)
    state = timm.create_model("test_resnet", num_classes=classes).state_dict()
    path = tmp_path / f"test_resnet_{classes}.pt"
    torch.save(state, path)
    return path, state


def _same_except_head(model: torch.nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    own = model.state_dict()
    body = [k for k in state if not k.startswith(f"{head}.")]
    assert body and all(torch.equal(own[k], state[k]) for k in body)


def test_timm_file_loads_its_weights_and_replaces_the_head(tmp_path: Path, offline: Path) -> None:
    path, state = _timm_file(tmp_path)
    model = create_model(TINY, 10, 3, {}, None, pretrained_file=str(path))
    _same_except_head(model, state, "fc")
    assert model.get_classifier().out_features == 10
    assert not torch.equal(model.fc.weight, state["fc.weight"][:10])  # a fresh head, not the file's first rows
    same = create_model(TINY, 1000, 3, {}, None, pretrained_file=str(path))
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())


def test_timm_file_adapts_the_first_convolution_to_the_channels(tmp_path: Path, offline: Path) -> None:
    path, state = _timm_file(tmp_path)
    model = create_model(TINY, 10, 1, {}, None, pretrained_file=str(path))
    assert model.conv1[0].weight.shape[1] == 1
    assert torch.allclose(model.conv1[0].weight[:, 0], state["conv1.0.weight"].sum(dim=1))  # timm sums channels


def test_torchvision_file_loads_then_replaces_the_head(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    model = create_model(TV, 10, 3, {}, None, pretrained=True, pretrained_file=str(path))
    _same_except_head(model, state, "fc")
    assert model.fc.out_features == 10 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    tuned = torchvision.models.resnet18(num_classes=10).state_dict()  # a file already fine-tuned to 10 classes
    torch.save(tuned, path)
    model = create_model(TV, 10, 3, {}, None, pretrained_file=str(path))
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())


def test_a_file_that_does_not_fit_is_one_line(tmp_path: Path, offline: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ConfigError, match=r"^model.pretrained_file: .*does not load into timm:test_resnet") as exc:
        create_model(TINY, 10, 3, {}, None, pretrained_file=str(path))
    assert "\n" not in str(exc.value)


def test_timm_offline_without_cache_names_the_hub_file(offline: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        create_model(TINY, 10, 3, {}, None, pretrained=True)
    text = str(exc.value)
    assert "\n" not in text and text.startswith("model.pretrained: timm:test_resnet's weights are not cached")
    assert "timm/test_resnet.r160_in1k" in text and str(offline) in text and "model.pretrained_file" in text


def test_torchvision_offline_without_cache_names_url_and_target(offline: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        create_model(TV, 10, 3, {}, None, pretrained=True)
    text = str(exc.value)
    target = offline / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "\n" not in text and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in text
    assert str(target) in text


def test_the_cli_offline_is_one_error_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**{"model.name": TINY, "model.pretrained": True})))
    done = subprocess.run(
        [sys.executable, str(REPO / "aip" / "train.py"), "--config", str(config), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "timm/test_resnet.r160_in1k" in errors[0] and "Traceback" not in done.stderr


def test_a_missing_file_is_refused_with_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model.pretrained_file: no file at .*nope.pt"):
        config_from_dict(tiny_run(**{"model.name": TINY, "model.pretrained_file": str(tmp_path / "nope.pt")}))


@pytest.mark.parametrize("name", ["cifar_resnet8", "mypkg.nets:Net"])
def test_pretrained_needs_a_library_model(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^model.pretrained: only timm: and torchvision: .*model.teacher_checkpoint"):
        config_from_dict(tiny_run(**{"model.name": name, "model.pretrained": True}))


def _checked(**overrides: object) -> None:
    check_names(config_from_dict(tiny_run(**overrides)))


def test_weights_in_kwargs_only_for_a_pretrained_torchvision_model() -> None:
    weights = {"weights": "IMAGENET1K_V1"}
    _checked(**{"model.name": TV, "model.pretrained": True})
    _checked(**{"model.name": TV, "model.pretrained": True, "model.kwargs": weights})
    with pytest.raises(ConfigError, match=r"^model.kwargs.weights: .*model.pretrained: true"):
        _checked(**{"model.name": TV, "model.kwargs": weights})
    with pytest.raises(ConfigError, match=r"^model.kwargs.weights: .*has no weights 'V9'; choose one of: IMAGENET1K"):
        _checked(**{"model.name": TV, "model.pretrained": True, "model.kwargs": {"weights": "V9"}})
    with pytest.raises(ConfigError, match=r"^model.kwargs: only used with"):
        _checked(**{"model.name": TINY, "model.pretrained": True, "model.kwargs": weights})


def test_data_settings_come_from_the_pretrained_config_unless_set() -> None:
    cfg = config_from_dict({"model": {"name": TINY, "pretrained": True}, "data": {"name": "cifar10", "root": "x"}})
    data, note = pretrained_data(cfg, ("mean", "std"))
    assert data.mean == [0.5, 0.5, 0.5] and data.std == [0.5, 0.5, 0.5] and data.image_size == 32
    assert note == (
        f"data: from the pretrained {TINY}: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5); "
        "not applicable to cifar10 data: size, resize"
    )
    cfg.data.mean = [0.1, 0.2, 0.3]
    data, note = pretrained_data(cfg, ("mean", "std"))
    assert data.mean == [0.1, 0.2, 0.3] and data.std == [0.5, 0.5, 0.5] and "set in the config: data.mean" in note
    folder = {"name": "imagefolder", "root": "x"}
    tv = config_from_dict({"model": {"name": TV, "pretrained": True}, "data": folder})
    data, _ = pretrained_data(tv, ("mean", "std", "size", "resize"))
    assert data.mean == [0.485, 0.456, 0.406] and data.image_size == 224 and data.eval_resize == 256
    plain = config_from_dict({"model": {"name": TINY}})
    assert pretrained_data(plain, ("mean", "std")) == (plain.data, None)


def test_imagefolder_takes_the_pretrained_crop_resize_and_normalisation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (50, 40), (200, 100, 50)).save(tmp_path / split / label / "0.png")
    folder = {"name": "imagefolder", "root": str(tmp_path)}
    cfg = config_from_dict({"model": {"name": TINY, "pretrained": True}, "data": folder})
    data = ClassificationTask().build_data(cfg)
    assert data.input_shape == (3, 160, 160)
    x, _ = data.val[0]
    pixel = torch.tensor([200, 100, 50]) / 255.0
    assert torch.allclose(x[:, 80, 80], (pixel - 0.5) / 0.5, atol=1e-5)  # normalised with the 0.5 mean and std
    assert data.val.transform.transforms[0].size == [168]  # floor(160 / 0.95), then the 160 crop
    out = capsys.readouterr().out
    assert f"data: from the pretrained {TINY}: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), size 160, resize 168" in out
    cfg.data.image_size = 64
    data = ClassificationTask().build_data(cfg)
    assert data.input_shape == (3, 64, 64) and data.val.transform.transforms[0].size == [67]  # 64 at 160/168


@pytest.mark.parametrize("classes", [4, 1000])
def test_the_teacher_is_the_pretrained_model_when_its_head_fits(
    classes: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], offline: Path, fresh_accelerator_state: None
) -> None:
    path, state = _timm_file(tmp_path, classes)
    run = tiny_run(**{"model.name": TINY, "model.pretrained_file": str(path), "train.teacher_epochs": 1})
    session = Session(config_from_dict(run), tmp_path / "run")
    teacher = load_teacher(session)
    out = capsys.readouterr().out
    if classes == 4:
        assert "teacher: the pretrained timm:test_resnet as it is" in out
        assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
        assert not (tmp_path / "run" / TEACHER_FILE).exists()
    else:
        assert (
            "model: timm:test_resnet pretrained head has 1000 classes; replaced by a new 4-class head; "
            "fine-tuning the teacher for 1 epochs"
        ) in out
        assert teacher.get_classifier().out_features == 4 and (tmp_path / "run" / TEACHER_FILE).is_file()
        assert not torch.equal(teacher.conv1[0].weight, state["conv1.0.weight"])  # fine-tuned from the file


@pytest.mark.slow
def test_debug_recipe_runs_from_a_timm_resnet18_file(tmp_path: Path) -> None:
    """The issue's end-to-end check: configs/debug.yaml with a pretrained timm ResNet-18 from a local file."""
    path = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "aip" / "train.py"), "--config", str(REPO / "configs" / "debug.yaml")]
    command += ["--out", str(tmp_path / "run"), "--set", "model.name=timm:resnet18", "model.pretrained=true"]
    command += [f"model.pretrained_file={path}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replaced by a new 10-class head" in done.stdout
    assert (tmp_path / "run" / "report.json").is_file()


def test_a_teacher_file_and_a_pruned_run_load_without_fetching_pretrained_weights(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch, fresh_accelerator_state: None
) -> None:
    """A checkpoint's weights replace the pretrained ones: loading one (a resume, aip.load_pruned) builds the bare
    architecture and works offline with the pretrained file gone."""
    path, _ = _timm_file(tmp_path, 4)
    run = tiny_run(**{"model.name": TINY, "model.pretrained_file": str(path)})
    session = Session(config_from_dict(run), tmp_path / "run")
    torch.manual_seed(2)
    saved = timm.create_model("test_resnet", num_classes=4).state_dict()
    torch.save(saved, tmp_path / "teacher.pt")

    def fetch(*_args: object, **_kwargs: object) -> torch.nn.Module:
        raise AssertionError("pretrained weights fetched for a model whose weights are loaded from a checkpoint")

    monkeypatch.setattr("aip.models.build_pretrained", fetch)
    loaded = session.load_weights(tmp_path / "teacher.pt")
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
