"""`task: detection` in the config: detector and detection data names, and what it does not support yet, each a
one-line ConfigError."""

from __future__ import annotations

import pytest

from aip.checks import check_names
from aip.config import ConfigError, config_from_dict

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
