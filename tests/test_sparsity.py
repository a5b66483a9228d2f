"""`prune.sparsity`: a stage of group-norm regularised training of the unpruned student before the first prune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from aip.config import ConfigError, config_from_dict
from aip.methods.pruning import plan_stages
from aip.models import create_model
from aip.prune.pruner import ChannelPruner
from aip.prune.sparsity import group_norm_regularizer
from aip.train import main
from tests.conftest import tiny_run
from tests.test_resume import _run_killed_after, assert_same_run

SPARSE = {"prune.sparsity": {"epochs": 1, "weight": 0.01}}


def test_the_sparsity_stage_comes_first_and_leaves_the_intervals_their_order() -> None:
    stages = plan_stages(config_from_dict(tiny_run(**SPARSE)))
    assert [(s.index, s.kind, s.epochs) for s in stages] == [
        (1, "sparsity", 1),
        (2, "prune", 1),
        (3, "prune", 1),
        (4, "finetune", 1),
    ]
    assert stages[0].target is None and stages[2].target == pytest.approx(0.6)
    assert [s.kind for s in plan_stages(config_from_dict(tiny_run()))] == ["prune", "prune", "finetune"]


def test_the_regulariser_pulls_the_weakest_group_hardest() -> None:
    """GroupNormPruner's gradient: weight * w * gamma, gamma from 1 (the strongest channel of a group set) to 16 (the
    weakest); the gradients start at zero, so each conv weight's gradient is that term alone."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", 4)
    pruner = ChannelPruner(model, torch.randn(1, 3, 16, 16), [model.fc])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    group_norm_regularizer(pruner, 0.01)()
    stem = model.conv1.weight
    gamma = (stem.grad / (0.01 * stem.data)).flatten(1)[:, 0]  # per output channel
    assert gamma.min() == pytest.approx(1.0, rel=1e-4) and gamma.max() == pytest.approx(16.0, rel=1e-4)
    assert all(p.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, nn.Conv2d) for p in [m.weight])
    assert model.fc.weight.grad.abs().sum() > 0  # its inputs are the last stage's channels, a group
    assert model.fc.bias.grad.abs().sum() == 0  # its outputs are the classes: ignored, never a group


def test_a_sparse_run_reports_the_stage_counts_intervals_after_it_and_resumes_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hybrid switch at interval 2 falls on stage 3 (the second prune, not the second stage); a run killed
    inside the sparsity stage ends as the unbroken one."""
    overrides = {
        **SPARSE,
        "prune.criterion": "hybrid",
        "prune.hybrid": {"switch_interval": 2, "switch_fraction": None},
        "checkpoint.every_n_steps": 3,
    }
    config = tmp_path / "sparse.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**overrides)))
    reference = tmp_path / "reference"
    assert main(["--config", str(config), "--out", str(reference)]) == 0
    report = json.loads((reference / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["sparsity", "prune", "prune", "finetune"]
    assert report["stages"][0]["flops"] == report["teacher"]["flops"]
    log = json.loads((reference / "pruning_log.json").read_text())
    assert [(e["stage"], e["criterion"]) for e in log] == [(2, "l1"), (3, "similarity")]
    killed = tmp_path / "killed"
    _run_killed_after(monkeypatch, ["--config", str(config), "--out", str(killed)], mid_stage=1)
    assert main(["--resume", str(killed)]) == 0
    assert_same_run(killed, reference)


def test_sparsity_training_is_refused_under_mode_acp() -> None:
    with pytest.raises(ConfigError, match=r"prune.sparsity.epochs: sparsity training is mode aip's"):
        config_from_dict(tiny_run(mode="acp", **SPARSE))
