"""Classification: in-memory or folder data sets, cross-entropy, top-1/top-5, logits to the discriminator, and what
ACP's width search needs of it (`ClassificationSearch`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from torch import nn
from torch.utils.data import Dataset

from aip.data import DATASETS, build_data
from aip.distill.adversarial import GRID
from aip.distill.losses import kd_loss
from aip.distill.step import DistillStep
from aip.export import write_exports
from aip.models import classifier_of, create_model, default_taps
from aip.models.pretrained import pretrained_data
from aip.prune.cost import model_cost
from aip.tasks.base import ExportTarget, SearchAdapter, Task

if TYPE_CHECKING:
    from aip.config import Config, LossConfig
    from aip.distill.step import StepParts


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """How many of `labels` are among the top-k `logits`, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Any, accelerator: Accelerator) -> tuple[float, float]:
    """Top-1 and top-5 (%) over the whole validation set, each sample counted once across processes; an in-memory
    set's uint8 batches are normalised here, on the device."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    transform = getattr(loader.dataset, "device_transform", None)
    for x, y in loader:
        if transform is not None:
            x = transform(x)
        with accelerator.autocast():
            logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits, y))
        c1, c5 = topk_correct(logits.float(), y)
        correct1 += int(c1)
        correct5 += int(c5)
        total += y.numel()
    model.train(was_training)
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


class ClassificationSearch(SearchAdapter):
    """ACP on a classifier: the training set through both transforms, CE (with KD under acp.distill), top-1."""

    def search_sets(self, data: Any) -> tuple[Dataset, Dataset]:
        return data.train, data.train_eval if data.train_eval is not None else data.train

    def view_inputs(self, view: nn.Module, x: Any, device: torch.device) -> torch.Tensor:
        return x.to(device)

    def recovery_loss(self, model: nn.Module, teacher: nn.Module, x: Any, y: Any, cfg: Config) -> torch.Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if cfg.acp.distill:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = kd_loss(logits, t_logits, cfg.loss.kd.temperature, cfg.loss.kd.kind)
            loss = cfg.loss.ce.weight * loss + cfg.loss.kd.weight * kd
        return loss

    @torch.no_grad()
    def holdout_score(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """Top-1 (%)."""
        correct = total = 0
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
        return 100.0 * correct / max(total, 1)


class ClassificationTask(Task):
    """Images to class logits; what the trainer did before detection, unchanged."""

    name = "classification"
    metrics = ("top1", "top5")
    loss_key = "loss_ce"
    disc_on_taps_only = False  # disc.input decides: logits, softmax or the taps' attention maps
    probes_classes = True
    search = ClassificationSearch()

    def build_data(self, cfg: Config) -> Any:
        """The data set, with a pretrained model's normalisation and sizes where the config leaves them unset."""
        takes = getattr(DATASETS.get(cfg.data.name), "takes_pretrained", ())
        data_cfg, note = pretrained_data(cfg, takes)
        if note is not None:
            PartialState().print(note)
        return build_data(data_cfg)

    def example(self, data: Any) -> torch.Tensor:
        return data.train[0][0].unsqueeze(0)

    def create_model(self, cfg: Config, data: Any, example: torch.Tensor) -> nn.Module:
        m = cfg.model
        return create_model(
            m.name, data.num_classes, data.input_shape[0], m.kwargs, example, m.pretrained, m.pretrained_file
        )

    def cost(self, model: nn.Module, example: torch.Tensor) -> dict[str, int]:
        c = model_cost(model, example)
        return {"params": c.params, "flops": c.flops}

    def prunable(self, model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor, list[nn.Module]]:
        return model, example, [classifier_of(model)]

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
        top1, top5 = evaluate_classifier(model, loader, accelerator)
        return {"top1": top1, "top5": top5}

    def describe(self, values: dict[str, float]) -> str:
        return f"top-1 {values['top1']:.2f}  top-5 {values['top5']:.2f}"

    def default_taps(self, model: nn.Module, cfg: Config) -> list[str]:
        return default_taps(model, cfg.model.name)

    def disc_features(self, num_classes: int, taps: list[str], disc_input: str) -> int:
        return len(taps) * GRID * GRID if disc_input == "attention" else num_classes

    def distill_step(self, parts: StepParts, losses: LossConfig, disc_steps: int = 1) -> DistillStep:
        return DistillStep(parts, losses, disc_steps)

    def export(self, target: ExportTarget, model: nn.Module, history: list, only_stale: bool) -> list[str]:
        return write_exports(model, target.example, target.run_dir, target.cfg.export.formats, only_stale)
