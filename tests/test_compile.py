"""`train.compile`: training under torch.compile matches eager training, compiles afresh after a prune, and leaves
checkpoints and exports with the plain model's keys; without a C++ compiler the config is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from aip import checkpoint as ckpt
from aip.compiled import compiled
from aip.config import ConfigError, LossConfig, config_from_dict, cxx_compiler
from aip.distill.discriminator import Discriminator
from aip.distill.features import FeatureTaps
from aip.distill.step import DistillStep, StepParts
from aip.models import classifier_of, create_model, default_taps
from aip.prune.importance import create_importance
from aip.prune.pruner import ChannelPruner
from aip.train import main
from tests.conftest import exported_outputs, tiny_run

needs_compiler = pytest.mark.skipif(
    cxx_compiler() is None, reason="torch.compile (inductor) needs a C++ compiler: no $CXX or g++ on this machine"
)


def test_compile_without_a_compiler_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-aip")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"compile": True}})
    assert str(info.value).startswith("train.compile: ") and "\n" not in str(info.value)
    config_from_dict({"train": {"compile": False}})  # only asked for when compiling


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@needs_compiler
def test_a_pruned_model_is_compiled_afresh_and_keeps_plain_keys() -> None:
    model = _Net().eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with compiled(model, True):
        torch.testing.assert_close(model(x), model.forward(x), rtol=1e-4, atol=1e-5)
        assert model._compiled_call_impl is not None
    pruner = ChannelPruner(model, x[:1], [classifier_of(model)])
    pruner.prune_to(0.5 * pruner.cost("flops"), "flops", create_importance("l1"))
    assert model.features[0].out_channels < 16
    with compiled(model, True):  # new Parameters and shapes: a stale graph would fail or give the old outputs
        torch.testing.assert_close(model(x), model.forward(x), rtol=1e-4, atol=1e-5)
    assert model._compiled_call_impl is None and list(model.state_dict()) == keys


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    config = tmp / "teacher.yaml"
    config.write_text(yaml.safe_dump(tiny_run(mode="train", **{"train.epochs": 1})))
    assert main(["--config", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "model.pt"


@needs_compiler
def test_compiled_training_matches_eager(teacher: Path, tmp_path: Path) -> None:
    """One prune and one recovery epoch, eager and compiled: the same stage weights and exported outputs up to
    float rounding (amplified over 8 adversarial steps), checkpoint keys without `_orig_mod.`; not bit-equal, so
    the run did compile. (A step whose attention taps went missing under compile would be off by far more: that
    term weighs 1000.)"""
    runs = {}
    for flag in (False, True):
        overrides = {
            "model.teacher_checkpoint": str(teacher),
            "prune.intervals": 1,
            "prune.finetune_epochs": 0,
            "train.compile": flag,
            "export.formats": ["pt2"],
            "logging.report_to": [],
        }
        config = tmp_path / f"compile-{flag}.yaml"
        config.write_text(yaml.safe_dump(tiny_run(**overrides)))
        runs[flag] = tmp_path / f"run-{flag}"
        assert main(["--config", str(config), "--out", str(runs[flag])]) == 0
    eager, fast = (load_file(str(ckpt.stage_dir(runs[f], 1) / ckpt.STATE_DIR / "model.safetensors")) for f in runs)
    assert list(fast) == list(eager) and not any("_orig_mod" in k for k in fast)
    floats = [k for k in eager if eager[k].is_floating_point()]
    a, b = (torch.cat([state[k].flatten().double() for k in floats]) for state in (eager, fast))
    assert 0 < (b - a).norm() / a.norm() < 1e-2  # some 2e-3 on this run: rounding, amplified by 8 steps
    torch.testing.assert_close(exported_outputs(runs[True]), exported_outputs(runs[False]), rtol=1e-2, atol=1e-2)


@needs_compiler
def test_compiled_distill_steps_give_the_eager_losses(fresh_accelerator_state) -> None:
    """The AIP step (taps, discriminator, all four loss terms) on a compiled student: each step's losses as eager."""
    acc = Accelerator(cpu=True)
    teacher = create_model("cifar_resnet8", 4).eval().requires_grad_(False)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))

    def losses(compile_student: bool) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
        torch.manual_seed(1)
        student, disc = copy.deepcopy(teacher).requires_grad_(True).train(), Discriminator(4)
        opt_s = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0)
        taps, out = default_taps(student, "cifar_resnet8"), []
        with FeatureTaps(teacher, taps) as t, FeatureTaps(student, taps) as s, compiled(student, compile_student):
            step = DistillStep(StepParts(acc, teacher, student, disc, disc, opt_s, opt_d, sched, t, s), LossConfig())
            for _ in range(3):
                out.append({k: v.item() for k, v in step(x, y)[1].items()})
        return out, student.state_dict()

    (eager, eager_state), (fast, fast_state) = losses(False), losses(True)
    assert len(eager[0]) == 5 and eager[0]["loss_at"] > 0
    for a, b in zip(eager, fast, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    for key, value in eager_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
