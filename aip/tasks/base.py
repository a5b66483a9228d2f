"""The interface a task implements: what differs between classification and detection, and what ACP's width search
needs of it (`SearchAdapter`, optional)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from aip.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from aip.config import Config, LossConfig
    from aip.distill.step import DistillStepBase, StepParts


@dataclass(frozen=True)
class ExportTarget:
    """What an export reads of the run: where to write, the example input, the config, the class count, the class
    of a model given as an object (`module:qualname`, None for a configured one) and how to print."""

    run_dir: Path
    example: torch.Tensor
    cfg: Config
    num_classes: int
    given: str | None
    print: Callable[..., None]


class SearchAdapter:
    """What ACP's width search (`aip/search/`) needs of a task: its data views, inputs, recovery loss and score."""

    def search_sets(self, data: Any) -> tuple[Dataset, Dataset]:
        """ACP's view of the training set, index for index: augmented (the candidates' short recovery) and through the
        validation transform (held-out scores, channel responses); neither may change with the run's epoch."""
        raise NotImplementedError

    def view_inputs(self, view: nn.Module, x: Any, device: torch.device) -> torch.Tensor:
        """A batch's inputs on `device` as the prunable view (`Task.prunable`) takes them: responses, calibration."""
        raise NotImplementedError

    def recovery_loss(self, model: nn.Module, teacher: nn.Module, x: Any, y: Any, cfg: Config) -> torch.Tensor:
        """An ACP candidate's training loss: the task loss, with KD from the frozen teacher under `acp.distill`."""
        raise NotImplementedError

    def holdout_score(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """ACP's fitness measure (%) of the eval-mode `model` over `loader`, on this process alone."""
        raise NotImplementedError


class Task:
    """The interface a task implements; `metrics` names the report's two quality columns, best first."""

    name: str = ""
    metrics: tuple[str, str] = ("", "")
    collate: Any = None  # the loaders' collate_fn; None: PyTorch's default
    loss_key: str = ""  # the distillation step's term of the task loss (weighted by loss.ce.weight)
    disc_on_taps_only: bool = False  # the discriminator always judges the taps' pooled attention, whatever disc.input
    probes_classes: bool = False  # a model given as an object has its class count read from its output
    search: SearchAdapter | None = None  # ACP's needs; None: this task cannot run mode acp

    def build_data(self, cfg: Config) -> Any:
        """The configured train and validation sets (with `num_classes`)."""
        raise NotImplementedError

    def example(self, data: Any) -> torch.Tensor:
        """One training input as a batch of one: what costs are measured on."""
        raise NotImplementedError

    def create_model(self, cfg: Config, data: Any, example: torch.Tensor) -> nn.Module:
        """A fresh model of the configured family (no weights loaded)."""
        raise NotImplementedError

    def cost(self, model: nn.Module, example: torch.Tensor) -> dict[str, int]:
        """Parameters and FLOPs of one forward of the example."""
        raise NotImplementedError

    def prunable(self, model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor, list[nn.Module]]:
        """The module the pruner traces (sharing `model`'s modules), its example input and the layers never pruned."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        """The supervised task loss of a batch (teacher training, calibration passes)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
        """The two quality metrics (%) over the whole validation set, named as `metrics`, each sample counted once
        across processes (the accelerator gives autocast, gather_for_metrics and the device)."""
        raise NotImplementedError

    def describe(self, values: dict[str, float]) -> str:
        """The metrics as the run prints them."""
        raise NotImplementedError

    def default_taps(self, model: nn.Module, cfg: Config) -> list[str]:
        """Attention-transfer taps when model.taps is null."""
        raise NotImplementedError

    def disc_features(self, num_classes: int, taps: list[str], disc_input: str) -> int:
        """The discriminator's input width for `disc.input` (logits, softmax or attention)."""
        raise NotImplementedError

    def distill_step(self, parts: StepParts, losses: LossConfig, disc_steps: int = 1) -> DistillStepBase:
        """One AIP training step over `parts`, called with (inputs, labels or targets); used as a context manager."""
        raise NotImplementedError

    def set_epoch(self, data: Any, value: int) -> None:
        """New seeded augmentations for an epoch (the session's epoch seed)."""

    def export(self, target: ExportTarget, model: nn.Module, history: list, only_stale: bool) -> list[str]:
        """Write the pruned model into `target.run_dir`; return what was written."""
        raise NotImplementedError


def search_adapter(task: Task) -> SearchAdapter:
    """The task's ACP adapter; a one-line ConfigError for a task without one, wherever ACP starts."""
    if task.search is None:
        raise ConfigError(f"mode acp: task {task.name} has no width search; use mode aip")
    return task.search
