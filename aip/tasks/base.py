"""The interface a task implements: what differs between classification and detection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from aip.config import Config, LossConfig
    from aip.session import Session


class Task:
    """The interface a task implements; `metrics` names the report's two quality columns, best first."""

    name: str = ""
    metrics: tuple[str, str] = ("", "")
    collate: Any = None  # the loaders' collate_fn; None: PyTorch's default

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

    def evaluate(self, session: Session, model: nn.Module, loader: Any) -> dict[str, float]:
        """The two quality metrics (%) over the whole validation set, named as `metrics`."""
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

    def distill_step(self, *args: Any, losses: LossConfig, disc_steps: int = 1) -> Any:
        """One AIP training step (DistillStep's arguments): called with (inputs, labels or targets)."""
        raise NotImplementedError

    def search_sets(self, data: Any) -> tuple[Dataset, Dataset]:
        """ACP's view of the training set, index for index: augmented (the candidates' short recovery) and through the
        validation transform (held-out scores, channel responses); neither may change with the run's epoch."""
        raise NotImplementedError

    def view_inputs(self, view: nn.Module, x: Any, device: torch.device) -> torch.Tensor:
        """A batch's inputs on `device` as the prunable view (`prunable`) takes them: responses, calibration."""
        raise NotImplementedError

    def recovery_loss(self, model: nn.Module, teacher: nn.Module, x: Any, y: Any, cfg: Config) -> torch.Tensor:
        """An ACP candidate's training loss: the task loss, with KD from the frozen teacher under `acp.distill`."""
        raise NotImplementedError

    def holdout_score(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """ACP's fitness measure (%) of the eval-mode `model` over `loader`, on this process alone."""
        raise NotImplementedError

    def set_epoch(self, data: Any, value: int) -> None:
        """New seeded augmentations for an epoch (the session's epoch seed)."""

    def export(self, session: Session, model: nn.Module, history: list, only_stale: bool) -> list[str]:
        """Write the pruned model beside the report; return what was written."""
        raise NotImplementedError
