"""The detection AIP step: every loss term present and finite, KD on the dense head's logits, the discriminator's
input independent of pruned widths, and the student's weights moved by the step."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator

from aip.config import LossConfig
from aip.distill.adversarial import GRID, pooled_attention
from aip.distill.discriminator import Discriminator
from aip.distill.features import FeatureTaps
from aip.distill.step import StepParts
from aip.tasks.detection.distill import DetectionDistillStep
from aip.tasks.detection.models import create_detector
from aip.tasks.detection.taps import detection_taps


def test_pooled_attention_has_a_width_independent_of_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    wide = [torch.rand(2, 16, 8, 8, generator=gen), torch.rand(2, 16, 4, 4, generator=gen)]
    narrow = [torch.rand(2, 5, 8, 8, generator=gen), torch.rand(2, 3, 4, 4, generator=gen)]
    assert pooled_attention(wide).shape == pooled_attention(narrow).shape == (2, 2 * GRID * GRID)
    same = pooled_attention([wide[0], wide[0]])
    torch.testing.assert_close(same[:, : GRID * GRID].norm(dim=1), torch.ones(2))  # each level L2-normalised
    uniform = pooled_attention([torch.ones(1, 4, 8, 8)])
    torch.testing.assert_close(uniform, torch.full((1, GRID * GRID), 1 / GRID))


def test_detection_step_logs_every_term_and_trains_the_student(fresh_accelerator_state: None) -> None:
    torch.manual_seed(0)
    teacher = create_detector("tiny_ssd", 3, 32, width=16).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    taps = detection_taps(teacher, 32)
    disc = Discriminator(len(taps) * GRID * GRID, [8])
    acc = Accelerator(cpu=True)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.01)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0)
    images = [torch.rand(3, 32, 32) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    before = copy.deepcopy(student.state_dict())
    with FeatureTaps(teacher, taps) as t_taps, FeatureTaps(student, taps) as s_taps:
        parts = StepParts(acc, teacher, student, disc, disc, opt_s, opt_d, sched, t_taps, s_taps)
        step = DetectionDistillStep(parts, LossConfig())
        with step:
            loss, terms = step(images, targets)
        assert step._hook is not None and not step._head
    names = {"loss_d", "loss_det", "loss_kd", "loss_at", "loss_adv", "loss_det_classification"}
    assert names <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    assert terms["loss_kd"] > 0 and terms["loss_at"] > 0  # batch statistics in training: the logits differ
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    off = LossConfig()
    off.kd.weight = 0.0
    with FeatureTaps(teacher, taps) as t_taps, FeatureTaps(student, taps) as s_taps:
        parts = StepParts(acc, teacher, student, disc, disc, opt_s, opt_d, sched, t_taps, s_taps)
        with DetectionDistillStep(parts, off) as step:
            _, terms = step(images, targets)
    assert terms["loss_kd"] == 0 and terms["loss_adv"] > 0
