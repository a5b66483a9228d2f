"""The config checks that need the registries: task, model, data set and criterion names, and each data set's own
keys.

`aip.config` validates values and imports no registry, so that the registries (which import `aip.config`) never
import it back; this module sits above both. Everything that runs a job calls `check_names` before any work:
`aip/runner.py` before it claims a run directory, and `Session.__init__` for every other caller. `check_batches`
refuses a training set smaller than one batch once the data is built.
"""

from __future__ import annotations

import importlib.util

from aip.config import TRACKERS, Config
from aip.data import DATASETS
from aip.errors import ConfigError
from aip.methods.modes import MODES
from aip.models import check_model_name
from aip.models.pretrained import check_pretrained
from aip.models.user import is_import_path
from aip.prune.importance import IMPORTANCES
from aip.registry import UnknownNameError
from aip.tasks import TASKS, task_for
from aip.tasks.base import search_adapter
from aip.tasks.detection.data import DETECTION_DATASETS
from aip.tasks.detection.datasets import build_detection_data, check_detection_data  # noqa: F401  (registers them)
from aip.tasks.detection.models import DETECTORS

# Criteria that rank by likeness rather than saliency: not allowed as the hybrid's saliency half.
LIKENESS_CRITERIA = ("hybrid", "similarity", "fpgm")
# Criteria an ACP cut cannot use: it ranks a group's channels once, on forward passes only.
NOT_FOR_ACP_CUTS = ("hybrid", "taylor")


def _one_of(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def check_names(cfg: Config, dataset: bool = True) -> None:
    """Raise a one-line ConfigError for a name no registry holds; `dataset`: also the data set's own checks.

    The data set's checks look for its files under data.root (without reading them); `--print-config` skips them.
    """
    check_task(cfg)
    _one_of("mode", cfg.mode, MODES.names())
    if cfg.task == "detection":
        check_detection_names(cfg)
    else:
        check_classification_names(cfg)
    _one_of("prune.criterion", cfg.prune.criterion, IMPORTANCES.names())
    saliency = [n for n in IMPORTANCES.names() if n not in LIKENESS_CRITERIA]
    _one_of("prune.hybrid.saliency", cfg.prune.hybrid.saliency, saliency)
    _one_of("acp.criterion", cfg.acp.criterion, [n for n in IMPORTANCES.names() if n not in NOT_FOR_ACP_CUTS])
    check_trackers(cfg)
    if dataset and cfg.task == "classification":
        DATASETS.get(cfg.data.name).validate(cfg.data)
    if dataset and cfg.task == "detection":
        check_detection_data(cfg.data)


def check_task(cfg: Config) -> None:
    """A task the registry holds and, under mode acp, one with a width search (`Task.search`)."""
    _one_of("task", cfg.task, TASKS.names())
    if cfg.mode == "acp":
        search_adapter(task_for(cfg))


def check_classification_names(cfg: Config) -> None:
    """A classifier and a classification data set: detection names point at `task: detection`."""
    if cfg.model.name in DETECTORS.names():
        raise ConfigError(f"model.name: {cfg.model.name!r} is a detector; set task: detection to train or prune it")
    if cfg.data.name in DETECTION_DATASETS.names() and cfg.data.name not in DATASETS.names():
        raise ConfigError(f"data.name: {cfg.data.name!r} is a detection data set; set task: detection to use it")
    try:
        check_model_name(cfg.model.name)
    except UnknownNameError as exc:
        raise ConfigError(f"model.name: {exc}") from None
    if not is_import_path(cfg.model.name):
        check_pretrained(cfg.model)
    _one_of("data.name", cfg.data.name, DATASETS.names())


def check_detection_names(cfg: Config) -> None:
    """A detector (registered or package.module:callable) and a detection data set under `task: detection`."""
    name = cfg.model.name
    if not is_import_path(name) and name not in DETECTORS.names():
        hint = " is a classifier" if _is_classifier(name) else " is not a detector"
        raise ConfigError(f"model.name: {name!r}{hint}; task detection takes: {', '.join(DETECTORS.names())}")
    if cfg.data.name not in DETECTION_DATASETS.names():
        raise ConfigError(
            f"data.name: {cfg.data.name!r} is not a detection data set; task detection takes: "
            f"{', '.join(DETECTION_DATASETS.names())}"
        )


def _is_classifier(name: str) -> bool:
    try:
        check_model_name(name)
    except UnknownNameError:
        return False
    return True


def check_trackers(cfg: Config) -> None:
    """Every tracker of `logging.report_to` must have its package installed: a one-line error naming it."""
    for tracker in cfg.logging.report_to:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(
                f"logging.report_to: {tracker} needs its package: pip install {TRACKERS[tracker]} "
                "(or drop it from logging.report_to)"
            )


def trains(cfg: Config, teacher_given: bool) -> bool:
    """Whether the run has a training phase: supervised epochs, a teacher to train, or recovery epochs."""
    if cfg.mode == "train":
        return cfg.train.epochs > 0
    if cfg.mode == "eval":
        return False
    recovery = cfg.prune.finetune_epochs > 0 or (cfg.mode == "aip" and cfg.prune.epochs_between > 0)
    return recovery or (cfg.train.teacher_epochs > 0 and not teacher_given)


def check_batches(cfg: Config, samples: int, teacher_given: bool) -> None:
    """A training set smaller than one batch would run no optimizer step at all (the loader drops the last, partial
    batch): refused before any work, for every data source."""
    if trains(cfg, teacher_given) and samples < cfg.data.batch_size:
        raise ConfigError(
            f"data: the training set has {samples} samples, fewer than one batch (data.batch_size="
            f"{cfg.data.batch_size}), so no optimizer step would run; lower data.batch_size or give more training data"
        )
