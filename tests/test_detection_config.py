"""`task: detection` in the config: detector and detection data names, what it does not support yet and the data keys
it cannot honour (data.mean/std, a training set under one batch), each a one-line ConfigError; data.train_subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from aip.checks import check_names
from aip.config import ConfigError, config_from_dict
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.task import DetectionTask
from aip.train import main
from tests.test_detection_data import _pennfudan
from tests.test_detection_run import tiny_detection

DETECTION = {"task": "detection", "model": {"name": "tiny_ssd"}, "data": {"name": "synthetic"}}


def _check(data: dict) -> None:
    check_names(config_from_dict(data), dataset=False)


def test_detection_config_is_accepted_and_classification_stays_the_default() -> None:
    _check(DETECTION)
    _check({**DETECTION, "mode": "acp"})
    assert config_from_dict({}).task == "classification"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**DETECTION, "prune": {"capacity": {"enabled": True}}}, "prune.capacity.enabled: not supported yet"),
        ({**DETECTION, "model": {"name": "cifar_resnet20"}}, "model.name: 'cifar_resnet20' is a classifier"),
        ({**DETECTION, "data": {"name": "cifar10"}}, "data.name: 'cifar10' is not a detection data set"),
        ({"model": {"name": "tiny_ssd"}}, "model.name: 'tiny_ssd' is a detector; set task: detection"),
        ({"data": {"name": "pennfudan"}}, "data.name: 'pennfudan' is a detection data set; set task: detection"),
        ({"data": {"options": {"val_size": 3}}}, "data.options: only task detection"),
        ({"task": "segmentation"}, "task: 'segmentation' is not allowed"),
    ],
)
def test_mismatched_task_names_are_one_line_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _check(data)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.mean": [0.4, 0.4, 0.4]}, "error: data.mean: detectors normalise inside the model"),
        ({"data.std": [0.2, 0.2, 0.2]}, "set model.kwargs.image_std instead and leave data.std null"),
        ({"data.train_subset": 10, "data.batch_size": 16}, "error: data.train_subset: 10 is smaller than data.batch_"),
        ({"data.train_size": 6}, "error: data.train_size: 6 is smaller than data.batch_size=8 (incomplete batches"),
        ({"data.options": {"train_size": 4}}, "error: data.train_size: 4 is smaller than data.batch_size=8"),
    ],
)
def test_what_detection_cannot_honour_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, overrides: dict, message: str
) -> None:
    config = tmp_path / "det.yaml"
    config.write_text(yaml.safe_dump(tiny_detection(**overrides)))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_a_split_that_leaves_less_than_one_batch_to_train_on_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _pennfudan(tmp_path / "PennFudanPed", 12)
    overrides = {"data.name": "pennfudan", "data.root": str(root), "data.options": {"val_size": 5}}
    config = tmp_path / "det.yaml"
    config.write_text(yaml.safe_dump(tiny_detection(**overrides)))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        "error: data.batch_size: 8 is more than the 7 training images of pennfudan (incomplete batches are dropped, "
        "so no step would run)"
    )


def test_train_subset_is_applied_to_the_detection_training_set(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_detection(**{"data.train_subset": 12}))
    data = DetectionTask().build_data(cfg)
    assert len(data.train) == 12 and len(data.val) == 8
    again = DetectionTask().build_data(config_from_dict(tiny_detection(**{"data.train_subset": 12, "seed": 1})))
    assert all(torch.equal(data.train.sample(i)[0], again.train.sample(i)[0]) for i in range(12))
    root = _pennfudan(tmp_path / "PennFudanPed", 12)
    overrides = {"data.name": "pennfudan", "data.root": str(root), "data.options": {"val_size": 2}}
    data = DetectionTask().build_data(config_from_dict(tiny_detection(**overrides, **{"data.train_subset": 9})))
    assert (len(data.train), len(data.val)) == (9, 2)


def test_tiny_ssd_takes_its_normalisation_through_model_kwargs() -> None:
    model = create_detector("tiny_ssd", 3, 32, image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.2, 0.3])
    assert (model.transform.image_mean, model.transform.image_std) == ([0.4, 0.45, 0.5], [0.2, 0.2, 0.3])
