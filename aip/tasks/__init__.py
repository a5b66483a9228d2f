"""What differs between classification and detection: data, the task loss, the metric, report columns, default taps.

`task_for(cfg)` gives the run's `Task` (`aip.tasks.base`); the session and the methods call it wherever the two
differ, so that the methods (`aip/methods/`) are written once against this interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aip.config import Config
    from aip.tasks.base import Task


def task_for(cfg: Config) -> Task:
    """The task `cfg.task` names."""
    if cfg.task == "detection":
        from aip.tasks.detection.task import DetectionTask

        return DetectionTask()
    from aip.tasks.classification import ClassificationTask

    return ClassificationTask()
