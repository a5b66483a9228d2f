"""Several processes (gloo on the CPU), crash-safe resume after SIGKILL, and fallback from a damaged checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aip import checkpoint as ckpt
from aip.train import main
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "aip" / "train.py")


def _config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_run(**overrides)))
    return path


def _launch_2proc(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with two processes; on a machine without GPU they form a gloo group on the CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, TRAIN, *args], capture_output=True, text=True, env=env, timeout=300)


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    config = _config(tmp / "teacher.yaml", mode="train", **{"train.epochs": 2})
    assert main(["--config", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "model.pt"


def test_two_processes_prune_identically_and_match_one_process(teacher: Path, tmp_path: Path) -> None:
    overrides = {"model.teacher_checkpoint": str(teacher), "prune.epochs_between": 0, "prune.finetune_epochs": 0}
    config = _config(tmp_path / "c.yaml", **overrides)
    assert main(["--config", str(config), "--out", str(tmp_path / "one")]) == 0
    done = _launch_2proc("--config", str(config), "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one = ckpt.read(ckpt.stage_dir(tmp_path / "one", 2))[0]
    two = ckpt.read(ckpt.stage_dir(tmp_path / "two", 2))[0]
    assert one == two  # the same channels removed, interval by interval
    log = json.loads((tmp_path / "two" / "pruning_log.json").read_text())
    assert len(log) == 2 and all(len(set(e["architecture_per_process"])) == 1 for e in log)
    assert all(len(e["architecture_per_process"]) == 2 for e in log)


def test_two_processes_train_prune_resume_and_agree(teacher: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "c.yaml", **{"model.teacher_checkpoint": str(teacher), "prune.criterion": "taylor"})
    run_dir = tmp_path / "run"
    done = _launch_2proc("--config", str(config), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    full = _report(run_dir)
    assert 0.6 * 0.95 <= full["stages"][-1]["flops"] / full["teacher"]["flops"] <= 0.6
    log = json.loads((run_dir / "pruning_log.json").read_text())
    assert all(len(e["architecture_per_process"]) == 2 and len(set(e["architecture_per_process"])) == 1 for e in log)
    for path in ckpt.list_checkpoints(run_dir)[1:]:  # as if it had died after stage 1
        shutil.rmtree(path)
    done = _launch_2proc("--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _report(run_dir) == full


def test_sigkill_mid_stage_then_resume_finishes_with_the_same_table(teacher: Path, tmp_path: Path) -> None:
    overrides = {"model.teacher_checkpoint": str(teacher), "prune.epochs_between": 3, "checkpoint.every_n_steps": 2}
    config = _config(tmp_path / "c.yaml", **overrides)
    reference = tmp_path / "reference"
    assert main(["--config", str(config), "--out", str(reference)]) == 0

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, TRAIN, "--config", str(config), "--out", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("stage-02-step-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "report.json").exists()
    newest = ckpt.latest_valid(run_dir)
    assert newest is not None and newest.name.startswith("stage-02-step-")

    assert main(["--config", str(config), "--resume", "auto", "--out", str(run_dir)]) == 0
    assert _report(run_dir) == _report(reference)
    assert not [p for p in ckpt.list_checkpoints(run_dir) if "-step-" in p.name and p.name < "stage-03"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(teacher: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "c.yaml", **{"model.teacher_checkpoint": str(teacher)})
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run_dir)]) == 0
    full = _report(run_dir)
    newest = ckpt.list_checkpoints(run_dir)[-1]
    weights = newest / ckpt.STATE_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (run_dir / "report.json").unlink()
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*{newest.name}"):
        assert main(["--config", str(config), "--resume", "auto", "--out", str(run_dir)]) == 0
    assert _report(run_dir) == full
    assert ckpt.verify(newest) is None  # rewritten whole, not patched in place
