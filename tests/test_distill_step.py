"""DistillStep under Accelerate: the discriminator stays out of the student's backward, the adversarial gradient
reaches the student, a shared fp16 GradScaler is updated once per accumulation window, and a bf16 run with gradient
accumulation trains, checkpoints by optimizer steps and exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn

from aip import checkpoint as ckpt
from aip.config import ATLoss, KDLoss, LossConfig, WeightedLoss
from aip.distill.adversarial import GRID, pooled_attention
from aip.distill.discriminator import Discriminator
from aip.distill.features import FeatureTaps
from aip.distill.step import DistillStep, StepParts
from aip.train import main
from tests.conftest import tiny_run

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(n)]


def _losses(ce: float = 0.7, kd: float = 0.3, adv: float = 1.0) -> LossConfig:
    return LossConfig(WeightedLoss(ce), KDLoss(weight=kd), ATLoss(weight=0.0), WeightedLoss(adv))


def _step(
    accelerator: Accelerator, losses: LossConfig, disc_optimizer: type[torch.optim.Optimizer] = torch.optim.Adam
) -> tuple[DistillStep, nn.Module, nn.Module]:
    """A DistillStep on seeded tiny models: (step, the bare student, the bare discriminator)."""
    torch.manual_seed(0)
    teacher, student, disc = _net().eval().requires_grad_(False), _net(), Discriminator(4, [8])
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0)
    opt_d = disc_optimizer(disc.parameters(), lr=1e-2)
    student_p, disc_p, opt_s, opt_d, sched = accelerator.prepare(student, disc, opt_s, opt_d, sched)
    taps = FeatureTaps(student, [])
    parts = StepParts(accelerator, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, taps, taps)
    step = DistillStep(parts, losses)
    return step, student, disc


def test_student_backward_leaves_the_discriminator_grads_untouched() -> None:
    """D's gradients after the step are those of its own loss: the student's loss, which runs through D, adds none."""
    snapshot: list[torch.Tensor] = []

    class KeepGrads(torch.optim.SGD):  # steps nothing, clears nothing: D's .grad stays visible after the step
        def step(self, closure=None):
            snapshot.extend(p.grad.clone() for p in self.param_groups[0]["params"])

        def zero_grad(self, set_to_none: bool = True) -> None:
            pass

    step, _, disc = _step(Accelerator(cpu=True), _losses(), disc_optimizer=KeepGrads)
    x, y = _batches(1)[0]
    _, terms = step(x, y)
    assert terms["loss_adv"].item() > 0 and len(snapshot) == len(list(disc.parameters()))
    for p, own in zip(disc.parameters(), snapshot, strict=True):
        assert torch.equal(p.grad, own)


def test_adversarial_gradient_reaches_the_student() -> None:
    step, student, _ = _step(Accelerator(cpu=True), _losses(ce=0.0, kd=0.0, adv=1.0))
    before = copy.deepcopy(student.state_dict())
    x, y = _batches(1)[0]
    _, terms = step(x, y)
    assert set(terms) == {"loss_d", "loss_ce", "loss_kd", "loss_at", "loss_adv"}
    for name, value in student.state_dict().items():  # plain SGD: a change is -lr times a non-zero gradient
        assert not torch.equal(value, before[name]), name


def test_shared_grad_scaler_is_updated_once_per_accumulation_window() -> None:
    """fp16 loss scaling must not change the result: with the discriminator's step updating the shared scale between
    the student's micro-batches, the student's accumulated gradients would be unscaled by the wrong factor."""
    results, scales = [], []
    for scaled in (False, True):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        if scaled:  # what Accelerate builds for fp16 on a GPU, here on the CPU: the scale doubles at every update
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        step, student, _ = _step(accelerator, _losses())
        for x, y in _batches(4):  # two windows of two micro-batches
            step(x, y)
        results.append(copy.deepcopy(student.state_dict()))
        scales.append(accelerator.scaler.get_scale() if scaled else None)
    assert scales[1] == 2.0**12  # one update per window, not one per optimizer
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_with_gradient_accumulation_trains_checkpoints_by_optimizer_steps_and_exports(tmp_path: Path) -> None:
    overrides = {
        "train.mixed_precision": "bf16",
        "train.grad_accum_steps": 2,
        "prune.intervals": 1,
        "prune.finetune_epochs": 1,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_run(**overrides)))
    run_dir = tmp_path / "run"
    assert main(["--config", str(tmp_path / "c.yaml"), "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["prune", "finetune"]
    assert report["stages"][-1]["top1"] > 35.0  # 4 classes: chance is 25%
    meta = json.loads((ckpt.list_checkpoints(run_dir)[-1] / "meta.json").read_text())
    assert meta["state"]["global_step"] == 2 * 8 // 2  # 2 epochs of 8 batches, 2 batches per optimizer step
    with torch.no_grad():
        out = torch.export.load(run_dir / "model_pruned.pt2").module()(torch.randn(2, 3, 16, 16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_disc_steps_updates_the_discriminator_that_many_times_per_student_step() -> None:
    """The update ratio: `disc_steps` discriminator updates per student update, each on the same batch."""
    calls: list[int] = []

    class Counting(torch.optim.Adam):
        def step(self, closure=None):
            calls.append(1)
            return super().step(closure)

    x, y = _batches(1)[0]
    finals = []
    for steps in (1, 3):
        calls.clear()
        step, _, disc = _step(Accelerator(cpu=True), _losses(), disc_optimizer=Counting)
        step.disc_steps = steps
        step(x, y)
        assert len(calls) == steps
        finals.append(torch.cat([p.detach().flatten() for p in disc.parameters()]))
    assert not torch.equal(finals[0], finals[1])


def test_attention_input_shows_the_discriminator_pooled_maps_and_trains_the_tapped_layers() -> None:
    """`disc.input: attention`: D sees the taps' pooled attention maps (teacher real, student fake), a width that
    pruning never changes, and the adversarial gradient reaches the layers under the tap."""
    torch.manual_seed(0)
    teacher, student = _net().eval().requires_grad_(False), _net()
    disc = Discriminator(GRID * GRID, [8], "attention")
    seen: list[torch.Tensor] = []
    disc.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach()))
    accelerator = Accelerator(cpu=True)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2)
    student_p, disc_p, opt_s, opt_d, sched = accelerator.prepare(student, disc, opt_s, opt_d, sched)
    conv_before = student[0].weight.detach().clone()
    with FeatureTaps(teacher, ["1"]) as t_taps, FeatureTaps(student, ["1"]) as s_taps:
        parts = StepParts(accelerator, teacher, student_p, disc_p, disc, opt_s, opt_d, sched, t_taps, s_taps)
        step = DistillStep(parts, _losses(ce=0.0, kd=0.0, adv=1.0))
        x, y = _batches(1)[0]
        with torch.no_grad():
            expected_real = pooled_attention([teacher[1](teacher[0](x))])
            expected_fake = pooled_attention([student[1](student[0](x))])
        _, terms = step(x, y)
    torch.testing.assert_close(seen[0], torch.cat([expected_real, expected_fake]))
    assert seen[0].shape == (16, GRID * GRID) and terms["loss_adv"].item() > 0
    assert not torch.equal(student[0].weight, conv_before)


def test_a_run_with_the_discriminator_on_attention_and_two_updates_per_step_trains(tmp_path: Path) -> None:
    """End to end, without attention transfer: the taps are still found for the discriminator's input, whose width
    (taps x GRID x GRID) survives the prunes, and the student learns."""
    overrides = {"loss.at.weight": 0.0, "disc.input": "attention", "disc.steps": 2, "prune.intervals": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_run(**overrides)))
    run_dir = tmp_path / "run"
    assert main(["--config", str(tmp_path / "c.yaml"), "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stages"][-1]["top1"] > 35.0  # 4 classes: chance is 25%
    disc_weights = load_file(ckpt.list_checkpoints(run_dir)[-1] / ckpt.STATE_DIR / "model_1.safetensors")
    first = disc_weights["net.0.weight"]
    assert first.shape[1] == 3 * GRID * GRID  # ResNet-8's three stages
