"""Failures a user can cause stop with exit status 2 and one `error:` line, never a traceback or progress-bar text:
a damaged image in the middle of an epoch, attention taps that name no module, a full disk while checkpointing."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from accelerate import Accelerator
from PIL import Image

from aip import checkpoint as ckpt
from aip import rundir
from aip.train import main
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent
QUICK = {"train.teacher_epochs": 1, "data.train_size": 64, "data.val_size": 32, "prune.finetune_epochs": 0}


def _config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run(**{**QUICK, **overrides})))
    return path


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


def test_a_damaged_image_mid_epoch_stops_with_its_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / c / f"{i}.png")
    bad = tmp_path / "data" / "train" / "b" / "5.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: found only when its batch is loaded
    overrides = {"mode": "train", "train.epochs": 1, "data.num_workers": 1}
    data = {"name": "imagefolder", "root": str(tmp_path / "data"), "image_size": 16, "batch_size": 4}
    config = _config(tmp_path, **overrides, **{f"data.{k}": v for k, v in data.items()})
    cmd = [sys.executable, str(REPO / "aip" / "train.py"), "--config", str(config), "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert f"cannot decode image {str(bad)!r}" in line


def test_taps_that_name_no_module_stop_before_any_training(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["--config", str(_config(tmp_path)), "--out", str(run_dir), "--set", "model.taps=[layer9]"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "model.taps: cifar_resnet8 has no module 'layer9'; close names: layer1, layer2, layer3" in line
    assert not (run_dir / "teacher.pt").exists()


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    save_state = Accelerator.save_state

    def full_on_the_second(self, output_dir: str, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_on_the_second)
    run_dir = tmp_path / "run"
    assert main(["--config", str(_config(tmp_path)), "--out", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot write checkpoint" in line and "stage-02: No space left on device" in line
    assert "the last good checkpoint, stage-01, is kept" in line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["stage-01"]  # no temporary left
    assert ckpt.latest_valid(run_dir) == ckpt.stage_dir(run_dir, 1)
    rundir.lock(run_dir).release()  # the failed run let go of its directory


def test_a_config_that_is_not_utf8_is_one_line_from_the_cli(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert main(["--config", str(path)]) == 2
    assert "not UTF-8 text" in _one_error_line(capsys.readouterr().err)


def test_the_largest_seed_runs(tmp_path: Path) -> None:
    config = _config(tmp_path, mode="train", seed=2**32 - 1, **{"train.epochs": 1})
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0  # NumPy refuses seeds >= 2**32


@pytest.mark.parametrize(
    ("section", "overrides", "fragment"),
    [
        ("train: 5\n", ["train.epochs=1"], "error: train: expected a mapping of keys, got 5"),
        ("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n", [], "duplicate key 'epochs' at line "),
    ],
    ids=["a-section-as-a-scalar", "a-duplicate-key"],
)
def test_recipe_mistakes_stop_before_any_work(
    tmp_path: Path, capsys, section: str, overrides: list[str], fragment: str
) -> None:
    recipe = tiny_run(**QUICK, mode="train")
    del recipe["train"]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(recipe) + section)
    run_dir = tmp_path / "run"
    assert main(["--config", str(path), "--out", str(run_dir), *(["--set", *overrides] if overrides else [])]) == 2
    assert fragment in _one_error_line(capsys.readouterr().err)
    assert not run_dir.exists()
