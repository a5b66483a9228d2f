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
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch_pruning as tp
import yaml
from torch.nn import functional as F

from aip import checkpoint as ckpt
from aip.prune.importance import create_importance
from aip.prune.rounding import device_round_to
from aip.train import main
from tests.conftest import exported_outputs, tiny_run
from tests.test_prune import Residual

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


def test_two_processes_prune_alike_under_a_latency_target(teacher: Path, tmp_path: Path) -> None:
    """With `prune.target_latency_ratio` rank 0 measures the latencies and broadcasts them, so both processes remove
    the same channels (their own timings would differ) and the report carries the measured latency per stage."""
    overrides = {
        "model.teacher_checkpoint": str(teacher),
        "prune.target_flops_ratio": None,
        "prune.target_latency_ratio": 0.7,
        "prune.epochs_between": 0,
        "prune.finetune_epochs": 0,
    }
    config = _config(tmp_path / "c.yaml", **overrides)
    done = _launch_2proc("--config", str(config), "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((tmp_path / "two" / "pruning_log.json").read_text())
    assert log and all(len(e["architecture_per_process"]) == 2 for e in log)
    assert all(len(set(e["architecture_per_process"])) == 1 for e in log)
    report = _report(tmp_path / "two")
    assert report["teacher"]["latency_ms"] > 0 and all(r["latency_ms"] > 0 for r in report["stages"])


@pytest.mark.slow
def test_two_processes_take_the_main_process_round_to_auto(teacher: Path, tmp_path: Path) -> None:
    """`prune.round_to: auto` is resolved on the main process and broadcast: both processes prune on its grid."""
    overrides = {"model.teacher_checkpoint": str(teacher), "prune.round_to": "auto", "prune.finetune_epochs": 0}
    config = _config(tmp_path / "c.yaml", **overrides)
    done = _launch_2proc("--config", str(config), "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    block = device_round_to(torch.device("cpu"))[0]
    assert done.stdout.count(f"prune.round_to auto: {block} ") == 1  # logged once, by the main process
    log = json.loads((tmp_path / "two" / "pruning_log.json").read_text())
    assert [e["round_to"] for e in log] == [block, block]
    assert all(len(set(e["architecture_per_process"])) == 1 for e in log)
    assert all(w % block == 0 for w in log[-1]["widths"].values())


def test_two_processes_share_the_acp_search_and_find_what_one_process_finds(teacher: Path, tmp_path: Path) -> None:
    """Each process scores its share of every swarm iteration (none waits hours in a collective while rank 0
    searches alone); the gathered scores drive the same swarm as one process's."""
    overrides = {
        "mode": "acp",
        "model.teacher_checkpoint": str(teacher),
        "prune.finetune_epochs": 0,
        "acp": {"holdout_size": 64, "recovery_steps": 3, "calibration_images": 64, "swarm": {"particles": 3}},
        "acp.swarm.iterations": 2,
    }
    config = _config(tmp_path / "c.yaml", **overrides)
    one = [sys.executable, TRAIN, "--config", str(config), "--out", str(tmp_path / "one")]
    done = subprocess.run(one, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    done = _launch_2proc("--config", str(config), "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    swarms = [json.loads((tmp_path / d / "acp_swarm.json").read_text()) for d in ("one", "two")]
    for key in ("global_best", "global_fitness", "best_fitness", "positions", "history"):
        assert swarms[0][key] == swarms[1][key], key
    logs = [json.loads((tmp_path / d / "pruning_log.json").read_text())[0] for d in ("one", "two")]
    assert logs[0]["widths"] == logs[1]["widths"]
    assert logs[0]["evaluations_per_process"] == [9] and logs[1]["evaluations_per_process"] == [6, 3]


def _own_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two calibration batches that only process `rank` sees (each process its own shard)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(2)]


def _scores_of_b(criterion: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The criterion's scores for conv b's group of a seeded residual model, recorded on `batches`."""
    torch.manual_seed(0)
    model = Residual()
    importance = create_importance(criterion)
    with importance.recording(model):
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 16, 16))
    return importance(graph.get_pruning_group(model.b, tp.prune_conv_out_channels, list(range(32))))


POOLED = ("taylor", "activation")


def _score_in_group(rank: int, world: int, init: str, out: str) -> None:
    """One of the gloo processes: score on its own batches, save the scores for the test to compare."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for criterion in POOLED:
            torch.save(_scores_of_b(criterion, _own_batches(rank)), Path(out) / f"{criterion}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_criteria_pool_every_process_batches_so_ranks_score_alike(tmp_path: Path) -> None:
    """Two gloo processes calibrate on different batches: both must get the scores one process gets on all of them
    (per-rank statistics would rank differently on each process and prune different channels)."""
    mp.spawn(_score_in_group, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    for criterion in POOLED:
        first, second = (torch.load(tmp_path / f"{criterion}-{rank}.pt") for rank in (0, 1))
        assert torch.equal(first, second), criterion
        alone = _scores_of_b(criterion, _own_batches(0) + _own_batches(1))
        assert torch.allclose(first, alone, rtol=1e-4, atol=1e-6), criterion
        own = _scores_of_b(criterion, _own_batches(0))
        assert not torch.allclose(own, alone, rtol=1e-2), criterion  # the shards do differ


DATA_DEPENDENT = {
    "taylor": {"prune.criterion": "taylor"},
    "activation": {"prune.criterion": "activation"},
    "similarity_features": {"prune.criterion": "similarity", "prune.similarity": {"source": "features"}},
    "capacity": {  # the caps of a 2-epoch teacher allow about 20% fewer FLOPs
        "prune.criterion": "l1",
        "prune.capacity": {"enabled": True, "batches": 4},
        "prune.target_flops_ratio": 0.85,
    },
}


@pytest.mark.parametrize(
    "case",
    [
        "taylor",
        pytest.param("activation", marks=pytest.mark.slow),
        pytest.param("similarity_features", marks=pytest.mark.slow),
        pytest.param("capacity", marks=pytest.mark.slow),
    ],
)
def test_two_processes_agree_with_data_dependent_criteria_after_real_recovery(
    case: str, teacher: Path, tmp_path: Path
) -> None:
    """Each process trains on its own shard between intervals, then scores channels on calibration batches: the
    ranks must still remove the same channels at every interval (the run itself stops if their digests differ)."""
    overrides = {"model.teacher_checkpoint": str(teacher), "prune.epochs_between": 1, "prune.finetune_epochs": 0}
    overrides |= DATA_DEPENDENT[case]
    config = _config(tmp_path / "c.yaml", **overrides)
    run_dir = tmp_path / "run"
    done = _launch_2proc("--config", str(config), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((run_dir / "pruning_log.json").read_text())
    assert [e["stage"] for e in log] == [1, 2]
    for entry in log:
        digests = entry["architecture_per_process"]
        assert len(digests) == 2 and digests[0] == digests[1], entry
    assert log[-1]["ratio_after"] <= overrides.get("prune.target_flops_ratio", 0.6) and log[0]["ratio_after"] < 1.0
    if case == "capacity":
        capacity = json.loads((ckpt.stage_dir(run_dir, 2) / "meta.json").read_text())["state"]["capacity"]
        assert capacity and all(0.0 <= c["max_ratio"] <= 1.0 for c in capacity.values())


def test_two_processes_train_prune_resume_and_agree(teacher: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "c.yaml", **{"model.teacher_checkpoint": str(teacher), "prune.criterion": "taylor"})
    run_dir = tmp_path / "run"
    done = _launch_2proc("--config", str(config), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    full, outputs = _report(run_dir), exported_outputs(run_dir)
    assert 0.6 * 0.95 <= full["stages"][-1]["flops"] / full["teacher"]["flops"] <= 0.6
    log = json.loads((run_dir / "pruning_log.json").read_text())
    assert all(len(e["architecture_per_process"]) == 2 and len(set(e["architecture_per_process"])) == 1 for e in log)
    for path in ckpt.list_checkpoints(run_dir)[1:]:  # as if it had died after stage 1
        shutil.rmtree(path)
    done = _launch_2proc("--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _report(run_dir) == full
    assert torch.equal(exported_outputs(run_dir), outputs)


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
    assert torch.equal(exported_outputs(run_dir), exported_outputs(reference))
    assert not [p for p in ckpt.list_checkpoints(run_dir) if "-step-" in p.name and p.name < "stage-03"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(teacher: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "c.yaml", **{"model.teacher_checkpoint": str(teacher)})
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run_dir)]) == 0
    full, outputs = _report(run_dir), exported_outputs(run_dir)
    newest = ckpt.list_checkpoints(run_dir)[-1]
    weights = newest / ckpt.STATE_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (run_dir / "report.json").unlink()
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*{newest.name}"):
        assert main(["--config", str(config), "--resume", "auto", "--out", str(run_dir)]) == 0
    assert _report(run_dir) == full
    assert torch.equal(exported_outputs(run_dir), outputs)
    assert ckpt.verify(newest) is None  # rewritten whole, not patched in place


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the launched worker process of `rank` (by the RANK its launcher gave it), or None yet."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and TRAIN in child.cmdline():
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.fixture(scope="module")
def two_process_reference(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, finished run) of an unbroken two-process run with mid-stage checkpoints every 2 steps."""
    tmp = tmp_path_factory.mktemp("reference")
    overrides = {"model.teacher_checkpoint": str(teacher), "prune.epochs_between": 3, "checkpoint.every_n_steps": 2}
    config = _config(tmp / "c.yaml", **overrides)
    done = _launch_2proc("--config", str(config), "--out", str(tmp / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    return config, tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_sigkill_of_one_rank_ends_the_whole_job_and_resume_finishes(
    rank: int, two_process_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """SIGKILL of one rank in the middle of stage 2 of a two-process run: the launcher tears the other down and the
    job exits non-zero within two minutes, never waiting in a collective; `--resume` on two processes then finishes
    with the table and export the unbroken two-process run has."""
    config, reference = two_process_reference
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    launcher = subprocess.Popen(
        [*cmd, TRAIN, "--config", str(config), "--out", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group, for the cleanup below
    )
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "checkpoints").glob("stage-02-step-*")) and time.monotonic() < deadline:
            assert launcher.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        victim = _rank_pid(launcher, rank)
        assert victim is not None, f"no rank-{rank} worker found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = launcher.wait(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert returncode != 0 and took < 120, (returncode, took)
    assert not (run_dir / "report.json").exists()
    newest = ckpt.latest_valid(run_dir)
    assert newest is not None and newest.name.startswith("stage-02"), newest

    done = _launch_2proc("--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _report(run_dir) == _report(reference)
    assert torch.equal(exported_outputs(run_dir), exported_outputs(reference))
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(run_dir))
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
