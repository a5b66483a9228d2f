"""ACP's measurements: the channel responses the clustering reads, and a candidate structure's fitness.

Both look at training images through the validation transform (`SearchAdapter.search_sets`): a measurement on
randomly cropped and flipped images would change with the random state. Only the candidates' short recovery trains
on augmented images. What differs between tasks goes through the run's `Task`: batches (`collate`), the prunable
view, and its `search` adapter for the data views, inputs, loss and score; classification is the default. The
candidates of a swarm iteration are shared out over the processes and their scores gathered (`spread`), so every
process works on the search and none waits idle for hours in a collective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from aip.config import Config, PruneConfig
from aip.hooks import inspecting
from aip.prune.importance import create_importance, needs_features
from aip.prune.pruner import ChannelPruner, PruningError
from aip.seeding import derive_seed, seeded
from aip.tasks.base import Task, search_adapter
from aip.tasks.classification import ClassificationTask

CLASSIFICATION = ClassificationTask()
BUDGET_SLACK = 1e-9  # relative: float rounding of a cost that meets its budget exactly


@dataclass
class SearchData:
    """The training set split for the search: a held-out part scores candidates, the rest trains and calibrates."""

    train: Dataset  # augmented images outside the held-out part: the candidates' short recovery
    holdout: Dataset  # held-out images, validation transform: the fitness
    calibration: Dataset  # images outside the held-out part, validation transform: responses and feature maps


def split_search_data(data: Any, holdout_size: int, seed: int, task: Task = CLASSIFICATION) -> SearchData:
    """A fixed random held-out part of `holdout_size` training images (by `seed`), and the rest."""
    train, view = search_adapter(task).search_sets(data)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    held, rest = order[:holdout_size].tolist(), order[holdout_size:].tolist()
    return SearchData(Subset(train, rest), Subset(view, held), Subset(view, rest))


@torch.no_grad()
def channel_responses(
    model: nn.Module,
    roots: dict[str, nn.Module],
    data: Dataset,
    count: int,
    batch_size: int,
    device: torch.device,
    task: Task = CLASSIFICATION,
) -> dict[str, torch.Tensor]:
    """Each root module's channel responses (channels, samples): spatial means over the first `count` images (a
    module called several times per image, such as a head shared by feature levels, adds a sample per call)."""
    store: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            pooled = out.float().flatten(2).mean(2) if out.dim() > 2 else out.float()
            store.setdefault(name, []).append(pooled.T.cpu())

        return hook

    subset = Subset(data, range(min(count, len(data))))  # type: ignore[arg-type]
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=task.collate)
    search = search_adapter(task)
    with inspecting(model, {m: keep(name) for name, m in roots.items()}):
        for x, _ in loader:
            model(search.view_inputs(model, x, device))
    return {name: torch.cat(chunks, dim=1) for name, chunks in store.items()}


def cut_to_widths(
    pruner: ChannelPruner,
    widths: dict[str, int],
    prune_cfg: PruneConfig,
    calibration: Dataset,
    batch_size: int,
    device: torch.device,
    task: Task = CLASSIFICATION,
    budget: float | None = None,
    metric: str = "flops",
    criterion: str = "l1",
) -> dict[str, int]:
    """Cut the pruner's model to `widths`, each group keeping its best channels by `criterion` (`acp.criterion`:
    l1 as in ACP's code; similarity keeps one of each cluster of near-identical channels). A criterion that reads
    feature maps first records them on `prune.calibration_batches` batches of `calibration` (in order: the same on
    every process and every run).

    Returns the widths the groups got. With `budget`, the cut model's cost (`metric`) is checked against it: a cut
    over budget (a removal that failed and left a group wider) raises PruningError instead of passing silently."""
    importance = create_importance(criterion, prune_cfg)
    if needs_features(importance):
        loader = DataLoader(calibration, batch_size=batch_size, collate_fn=task.collate)
        search = search_adapter(task)
        with torch.no_grad(), importance.recording(pruner.model), inspecting(pruner.model):
            for x, _ in islice(loader, prune_cfg.calibration_batches):
                pruner.model(search.view_inputs(pruner.model, x, device))
    reached = pruner.prune_to_widths(widths, importance)
    if budget is not None and pruner.cost(metric) > budget * (1 + BUDGET_SLACK):
        wider = {n: (w, reached[n]) for n, w in widths.items() if reached.get(n, w) > w}
        raise PruningError(
            f"the cut model's {metric} are {pruner.cost(metric) / budget:.4f} of the budget; groups left wider than "
            f"asked (asked, got): {wider or 'none'}; refused: {pruner.refused or 'none'}"
        )
    return reached


def recovered_score(
    cfg: Config,
    teacher: nn.Module,
    widths: dict[str, int],
    example: torch.Tensor,
    data: SearchData,
    task: Task = CLASSIFICATION,
) -> float:
    """The held-out score (%) of the teacher cut to `widths` after `acp.recovery_steps` training steps: top-1 for
    classification, mAP@.5 for detection (`SearchAdapter.holdout_score`), trained on `SearchAdapter.recovery_loss`.

    Seeded from the run's seed and the widths alone, so a candidate scores the same on any process, in any order,
    and leaves the global random state as it found it."""
    return recovered(cfg, teacher, widths, example, data, task)[0]


def recovered(
    cfg: Config,
    teacher: nn.Module,
    widths: dict[str, int],
    example: torch.Tensor,
    data: SearchData,
    task: Task = CLASSIFICATION,
) -> tuple[float, dict[str, int]]:
    """`recovered_score`, and the widths the candidate model was really cut to (what its cost must be priced at)."""
    device, search = example.device, search_adapter(task)
    with seeded(derive_seed(cfg.seed, "acp-candidate", tuple(widths.values()))):
        model = copy.deepcopy(teacher).requires_grad_(True).train()
        pruner = ChannelPruner(*task.prunable(model, example))
        reached = cut_to_widths(
            pruner, widths, cfg.prune, data.calibration, cfg.data.batch_size, device, task, criterion=cfg.acp.criterion
        )
        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(
            data.train,
            batch_size=cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            generator=gen,
            collate_fn=task.collate,
        )
        steps = 0
        while steps < cfg.acp.recovery_steps:
            for x, y in loader:
                loss = search.recovery_loss(model, teacher, *send_to_device((x, y), device), cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                if steps == cfg.acp.recovery_steps:
                    break
        model.eval()
        holdout = DataLoader(data.holdout, batch_size=cfg.data.eval_batch_size, collate_fn=task.collate)
        with torch.no_grad():
            return search.holdout_score(model, holdout, device), {**widths, **reached}


def spread(
    accelerator: Any, score: Callable[[list[int]], float], candidates: list[list[int]]
) -> tuple[list[float], int]:
    """Score candidate i on process i mod (number of processes), then give every process all the scores.

    Returns the scores in the order of `candidates` and how many this process computed."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = {i: float(score(c)) for i, c in enumerate(candidates) if i % world == rank}
    if world == 1:
        return [mine[i] for i in range(len(candidates))], len(mine)
    from accelerate.utils import gather_object

    merged: dict[int, float] = {}
    for part in gather_object([mine]):
        merged.update(part)
    return [merged[i] for i in range(len(candidates))], len(mine)
