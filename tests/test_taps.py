"""Taps are checked whenever anything reads them: attention transfer, and the discriminator on attention maps (the
default) even with `loss.at.weight: 0`. A model whose stages cannot be found, with attention transfer off and no
`model.taps`, is pruned with the discriminator on its logits, a warning and a note in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import TensorDataset

import aip
from aip.config import ConfigError, config_from_dict
from aip.distill.parts import check_taps
from aip.methods.pruning import check_round_to
from aip.session import Session
from aip.train import main
from tests.conftest import tiny_run

QUICK = {"train.teacher_epochs": 1, "data.train_size": 64, "data.val_size": 32, "prune.finetune_epochs": 0}


def _plain_net() -> nn.Module:
    """Convolutions at one resolution, then a pooled classifier: no stages for attention transfer to find."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    return TensorDataset(x, y), TensorDataset(x[:32], y[:32])


def test_a_misspelled_tap_stops_before_any_training_with_attention_transfer_off(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**QUICK, **{"loss.at.weight": 0.0, "model.taps": ["layer9"]})))
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.taps: cifar_resnet8 has no module 'layer9'" in lines[0]
    assert not (run_dir / "teacher.pt").exists()


def test_a_model_without_stages_prunes_with_the_discriminator_on_its_logits(tmp_path: Path, capsys) -> None:
    cfg = config_from_dict(tiny_run(**{**QUICK, "loss.at.weight": 0.0, "data.batch_size": 16}))
    train, val = _data()
    result = aip.run(cfg, teacher=_plain_net(), train_data=train, val_data=val, out=tmp_path / "run")
    assert result.report["stages"][-1]["flops"] < result.report["teacher"]["flops"]
    notes = json.loads((tmp_path / "run" / "report.json").read_text())["notes"]
    assert len(notes) == 1 and "Sequential (the model given)" in notes[0] and "judges the logits" in notes[0]
    assert "## Notes" in (tmp_path / "run" / "report.md").read_text()
    assert "warning: disc.input attention: no stages found" in capsys.readouterr().out


def test_attention_transfer_on_a_model_without_stages_names_the_model_given(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_run(**{**QUICK, "data.batch_size": 16}))
    train, val = _data()
    with pytest.raises(ConfigError, match=r"^model.taps: cannot find the stages of 'Sequential \(the model given\)'"):
        aip.run(cfg, teacher=_plain_net(), train_data=train, val_data=val, out=tmp_path / "run")
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_the_checks_before_training_leave_the_teachers_initial_weights_alone(tmp_path: Path) -> None:
    """The taps and round_to checks build a model of their own: the teacher a run then trains must start from the
    weights it would have had without them (the global random streams untouched)."""
    cfg = config_from_dict(tiny_run(**{"prune.round_to": 2}))

    def first_model(checked: bool, where: str) -> dict[str, torch.Tensor]:
        session = Session(cfg, tmp_path / where)
        set_seed(0)
        if checked:
            check_taps(session)
            check_round_to(session)
        return session.new_model().state_dict()

    plain, checked = first_model(False, "plain"), first_model(True, "checked")
    for name, value in plain.items():
        assert torch.equal(value, checked[name]), name
