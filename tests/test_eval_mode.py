"""`mode: eval`: params, FLOPs, top-1 and top-5 of a checkpoint, end to end; and the published CIFAR-10 ResNets."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from aip.config import DataConfig
from aip.data import build_data
from aip.models import create_model
from aip.prune.cost import model_cost
from aip.train import main
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO.parent / "shared" / "weights"
# Opt-in: the published-ResNet test runs only when this names the extracted CIFAR-10 tree (minutes on a CPU).
CIFAR10_ROOT = os.environ.get("AIP_CIFAR10_ROOT")


def _eval_config(tmp_path: Path, **overrides) -> Path:
    cfg = tiny_run(mode="eval", **overrides)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@torch.no_grad()
def _top1_by_hand(model: torch.nn.Module, data: DataConfig) -> float:
    val = build_data(data).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def test_eval_reports_the_checkpoint_and_no_stages(tmp_path: Path) -> None:
    model = create_model("cifar_resnet8", 4)
    torch.save({"epoch": 1, "model_state_dict": model.state_dict()}, tmp_path / "w.pth")
    mean, std = [0.5, -0.5, 0.0], [2.0, 2.0, 1.0]
    config = _eval_config(tmp_path, **{"model.teacher_checkpoint": str(tmp_path / "w.pth"), "data.mean": mean})
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), "--set", f"data.std={std}", "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stages"] == []
    data_cfg = DataConfig(**{**tiny_run()["data"], "mean": mean, "std": std})
    teacher = report["teacher"]
    assert teacher["top1"] == pytest.approx(_top1_by_hand(model, data_cfg), abs=1e-9)
    cost = model_cost(model, torch.zeros(1, 3, 16, 16))
    assert (teacher["params"], teacher["flops"]) == (cost.params, cost.flops)
    assert teacher["top1"] <= teacher["top5"] <= 100.0
    assert "| teacher | - |" in (run_dir / "report.md").read_text()
    for absent in ("report.png", "teacher.pt", "checkpoints", "model_pruned.pt2"):
        assert not (run_dir / absent).exists(), absent


def test_eval_needs_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(_eval_config(tmp_path)), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.teacher_checkpoint: required in mode eval (the weights to evaluate)"
    )
    assert not (tmp_path / "run").exists()


def test_eval_of_a_mismatched_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(create_model("cifar_resnet20", 4).state_dict(), tmp_path / "r20.pt")
    config = _eval_config(tmp_path, **{"model.teacher_checkpoint": str(tmp_path / "r20.pt")})
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.teacher_checkpoint ") and "\n" not in err
    assert "unexpected (layer1.1.conv1.weight" in err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("text", "not a readable PyTorch checkpoint"),
        ("nan", "conv1.weight holds 1 non-finite values (NaN or Inf)"),
        ("namespace", "set model.trust_checkpoint: true to unpickle it"),
    ],
)
def test_unusable_checkpoints_stop_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str, fragment: str
) -> None:
    path = tmp_path / "teacher.pt"
    state = create_model("cifar_resnet8", 4).state_dict()
    if content == "text":
        path.write_text("these are not weights\n")
    elif content == "nan":
        state["conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, path)
    else:
        torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    config = _eval_config(tmp_path, **{"model.teacher_checkpoint": str(path)})
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.teacher_checkpoint ") and fragment in lines[0], lines
    if content == "namespace":
        assert (
            main(["--config", str(config), "--set", "model.trust_checkpoint=true", "--out", str(tmp_path / "t")]) == 0
        )


@pytest.mark.slow
@pytest.mark.parametrize(("depth", "published"), [(20, 92.60), (56, 94.37)])
def test_published_cifar10_resnets_score_their_published_top1(tmp_path: Path, depth: int, published: float) -> None:
    """Opt-in: AIP_CIFAR10_ROOT names the extracted ../shared/data/cifar10.tar.gz; 1-3 minutes each on 2 cores."""
    weights = WEIGHTS / f"cifar10_resnet{depth}.pth"
    if not weights.is_file():
        pytest.skip(f"no published weights at {weights} (see ../shared/weights/README.md)")
    if CIFAR10_ROOT is None:
        pytest.skip(
            "opt-in: set AIP_CIFAR10_ROOT to the CIFAR-10 tree (train/, test/), e.g. after mkdir -p "
            "~/.cache/aip/cifar10 && tar -xzf ../shared/data/cifar10.tar.gz -C ~/.cache/aip/cifar10"
        )
    root = Path(CIFAR10_ROOT).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"AIP_CIFAR10_ROOT={CIFAR10_ROOT!r} holds no train/ and test/ folders (extract cifar10.tar.gz)")
    config = REPO / "configs" / f"cifar10_resnet{depth}_eval.yaml"
    overrides = [f"model.teacher_checkpoint={weights}", f"data.root={root}"]
    assert main(["--config", str(config), "--set", *overrides, "--out", str(tmp_path / "run")]) == 0
    top1 = json.loads((tmp_path / "run" / "report.json").read_text())["teacher"]["top1"]
    assert abs(top1 - published) <= 0.05, top1
