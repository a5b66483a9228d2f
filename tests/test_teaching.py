"""Who teaches each stage and how hard: `loss.teacher: assistant` and `loss.at.schedule: lr | ramp | warmup |
after_prune`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import aip.methods.aip as aip_method
import aip.methods.pruning as pruning
from aip import checkpoint as ckpt
from aip.config import ATLoss, LossConfig
from aip.distill.step import DistillStep, StepParts
from aip.methods.recovery import Stage, stage_losses
from aip.train import main
from tests.conftest import exported_outputs, tiny_run


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_an_assistant_teaches_each_stage_after_the_first_and_a_resume_inside_a_stage_finds_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Stage 1 learns from the teacher; stage k > 1 from a frozen copy of the student as stage k - 1 left it (its
    widths, its weights); a run resumed inside stage 2 rebuilds that assistant from stage 1's checkpoint and ends
    as the unbroken run does."""
    seen: list[dict] = []
    original = pruning.recover

    def spy(session, stage, student, teacher, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(
            {
                "stage": stage.index,
                "widths": _widths(teacher),
                "student_widths": _widths(session.accelerator.unwrap_model(student)),
                "frozen": not teacher.training and not any(p.requires_grad for p in teacher.parameters()),
                "weights": [p.detach().clone() for p in teacher.parameters()],
                "student": [p.detach().clone() for p in session.accelerator.unwrap_model(student).parameters()],
            }
        )
        return original(session, stage, student, teacher, *args, **kwargs)

    monkeypatch.setattr(pruning, "recover", spy)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run(**{"loss.teacher": "assistant", "checkpoint.keep": 10})))
    run = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run)]) == 0
    first, second, third = seen
    assert first["frozen"] and first["widths"] != first["student_widths"]  # the unpruned teacher, student pruned
    assert second["frozen"] and second["widths"] == first["student_widths"]  # stage 1's student ...
    assert second["widths"] != second["student_widths"]  # ... before stage 2's prune
    assert third["frozen"] and third["widths"] == second["student_widths"]  # the fine-tune: stage 2's student
    assert sum(w.numel() for w in second["weights"]) > sum(w.numel() for w in second["student"])

    # A run cut inside stage 2 (after its mid-stage checkpoint) rebuilds the assistant from stage-01 on resume.
    rerun = yaml.safe_load(config.read_text())
    rerun["checkpoint"]["every_n_steps"] = 10  # 8 steps per epoch: a checkpoint inside stage 2
    config.write_text(yaml.safe_dump(rerun))
    resumed = tmp_path / "resumed"
    end_stage = aip_method.end_stage

    def killed(session, stage, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if stage.index == 2:
            raise RuntimeError("killed")
        return end_stage(session, stage, *args, **kwargs)

    monkeypatch.setattr(aip_method, "end_stage", killed)
    with pytest.raises(RuntimeError, match="killed"):
        main(["--config", str(config), "--out", str(resumed)])
    monkeypatch.setattr(aip_method, "end_stage", end_stage)
    inside = ckpt.stage_dir(resumed, 2, 10)
    assert inside.is_dir(), [c.name for c in ckpt.list_checkpoints(resumed)]
    seen.clear()
    assert main(["--resume", str(inside)]) == 0
    assert seen[0]["stage"] == 2 and seen[0]["widths"] == first["student_widths"] and seen[0]["frozen"]
    unbroken = tmp_path / "unbroken"
    assert main(["--config", str(config), "--out", str(unbroken)]) == 0
    assert torch.equal(exported_outputs(resumed), exported_outputs(unbroken))

    # Without stage 1's checkpoint the same resume stops in one line.
    monkeypatch.setattr(aip_method, "end_stage", killed)
    again = tmp_path / "again"
    with pytest.raises(RuntimeError, match="killed"):
        main(["--config", str(config), "--out", str(again)])
    shutil.rmtree(ckpt.stage_dir(again, 1))
    capsys.readouterr()
    assert main(["--resume", str(ckpt.stage_dir(again, 2, 10))]) == 2
    assert "needs the teacher assistant of stage 1" in capsys.readouterr().err


def test_the_attention_weight_follows_the_learning_rate_under_lr_mirrors_it_under_ramp_and_warms_up() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    parts = StepParts(None, model, model, model, model, opt, opt, sched, None, None)  # type: ignore[arg-type]
    constant = DistillStep(parts, LossConfig(at=ATLoss(weight=1000.0, schedule="constant")))
    follows = DistillStep(parts, LossConfig(at=ATLoss(weight=1000.0, schedule="lr")))
    ramp = DistillStep(parts, LossConfig(at=ATLoss(weight=1000.0, schedule="ramp")))
    warmup = DistillStep(parts, LossConfig(at=ATLoss(weight=1000.0, schedule="warmup")))
    assert constant.at_weight() == follows.at_weight() == 1000.0 and ramp.at_weight() == warmup.at_weight() == 0.0
    opt.step()
    sched.step()  # a quarter of the way: cosine at (1 + cos(pi/4)) / 2 of its start
    assert follows.at_weight() == pytest.approx(500.0 * (1 + 2**-0.5))
    assert ramp.at_weight() == pytest.approx(1000.0 - 500.0 * (1 + 2**-0.5))
    assert warmup.at_weight() == pytest.approx(2 * ramp.at_weight())
    sched.step()  # half way through the stage: cosine at 1/2 of its start
    assert constant.at_weight() == 1000.0
    assert follows.at_weight() == pytest.approx(500.0) and ramp.at_weight() == pytest.approx(500.0)
    assert warmup.at_weight() == pytest.approx(1000.0)
    sched.step()  # past half way warmup holds the full weight
    assert warmup.at_weight() == 1000.0 and ramp.at_weight() < 1000.0


def test_after_prune_ramps_attention_in_the_stages_that_prune_and_warms_it_up_in_the_fine_tune() -> None:
    assert LossConfig().at.schedule == "after_prune"  # the default
    losses = LossConfig(at=ATLoss(weight=1000.0, schedule="after_prune"))
    prune, finetune = Stage(1, "prune", 1, 0.7), Stage(3, "finetune", 1, None)
    assert stage_losses(losses, prune).at == ATLoss(weight=1000.0, schedule="ramp")
    assert stage_losses(losses, finetune).at == ATLoss(weight=1000.0, schedule="warmup")
    assert losses.at.schedule == "after_prune"  # the run's own config is left alone
    for schedule in ("constant", "lr", "ramp", "warmup"):  # the others hold in every stage
        fixed = LossConfig(at=ATLoss(weight=1000.0, schedule=schedule))
        assert stage_losses(fixed, prune) is fixed and stage_losses(fixed, finetune) is fixed


def test_a_ramped_attention_weight_under_a_constant_learning_rate_is_refused_in_one_line() -> None:
    from aip.config import ConfigError, config_from_dict

    for schedule in ("ramp", "warmup", "after_prune"):
        with pytest.raises(ConfigError, match=f"loss.at.schedule: {schedule} ramps .* train.scheduler constant"):
            config_from_dict(tiny_run(**{"loss.at.schedule": schedule, "train.scheduler": "constant"}))
    config_from_dict(tiny_run(**{"loss.at.schedule": "lr", "train.scheduler": "constant"}))  # a constant weight
