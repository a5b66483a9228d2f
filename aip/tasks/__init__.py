"""What differs between classification and detection: data, the task loss, the metric, report columns, default taps.

`TASKS` files each task's factory under the name `cfg.task` takes; a factory imports its module when called, so a
classification run never imports the detection task. `task_for(cfg)` gives the run's `Task` (`aip.tasks.base`); the
session and the methods call it wherever the two differ, so that the methods (`aip/methods/`) are written once
against this interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aip.registry import Registry

if TYPE_CHECKING:
    from aip.config import Config
    from aip.tasks.base import Task

TASKS = Registry("task")


@TASKS.register("classification")
def classification() -> Task:
    """Images to class logits (`aip.tasks.classification`)."""
    from aip.tasks.classification import ClassificationTask

    return ClassificationTask()


@TASKS.register("detection")
def detection() -> Task:
    """Images to boxes (`aip.tasks.detection.task`)."""
    from aip.tasks.detection.task import DetectionTask

    return DetectionTask()


def task_for(cfg: Config) -> Task:
    """The task `cfg.task` names (an UnknownNameError listing the known ones for any other)."""
    return TASKS.get(cfg.task)()
