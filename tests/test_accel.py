"""Meeting Accelerate: mixed precision follows the launcher unless the config says otherwise (a contradiction is an
error), ACP sets a process-group timeout, and the declared torch floor has the APIs the code calls."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from aip.accel import LAUNCHER_PRECISION, mixed_precision, process_group_kwargs
from aip.config import ConfigError, config_from_dict
from aip.session import Session
from aip.train import main
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.mark.parametrize(
    ("config", "launcher", "expected"),
    [(None, "bf16", None), (None, None, None), ("bf16", "bf16", "bf16"), ("fp16", None, "fp16"), ("no", "NO", "no")],
)
def test_mixed_precision_leaves_the_launchers_choice_alone(
    monkeypatch: pytest.MonkeyPatch, config: str | None, launcher: str | None, expected: str | None
) -> None:
    if launcher is None:
        monkeypatch.delenv(LAUNCHER_PRECISION, raising=False)
    else:
        monkeypatch.setenv(LAUNCHER_PRECISION, launcher)
    assert mixed_precision(config_from_dict(tiny_run(**{"train.mixed_precision": config}))) == expected


def test_accelerate_launch_bf16_reaches_the_accelerator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; the config default must keep it."""
    monkeypatch.setenv(LAUNCHER_PRECISION, "bf16")
    engine = Session(config_from_dict(tiny_run()), tmp_path / "run")
    assert engine.accelerator.mixed_precision == "bf16"


def test_config_that_contradicts_the_launcher_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LAUNCHER_PRECISION, "bf16")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_run(**{"train.mixed_precision": "no"})))
    assert main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.mixed_precision: 'no' contradicts the launcher's 'bf16'")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        config_from_dict(tiny_run(**{"train.mixed_precision": "fp32"}))


def test_acp_runs_get_a_long_process_group_timeout() -> None:
    assert process_group_kwargs(config_from_dict(tiny_run())) == {}
    acp = config_from_dict(tiny_run(mode="acp", acp={"holdout_size": 64, "timeout_minutes": 300}))
    assert process_group_kwargs(acp) == {"timeout": timedelta(minutes=300)}


def test_the_torch_floor_has_torch_accelerator() -> None:
    """torch.accelerator (used to decide CPU-only runs) first shipped in torch 2.6."""
    uses = [p for p in (REPO / "aip").rglob("*.py") if "torch.accelerator." in p.read_text()]
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text())
    assert floor is not None
    if uses:
        assert (int(floor[1]), int(floor[2])) >= (2, 6), [str(p) for p in uses]


def test_auto_workers_share_this_machines_cpus_among_its_own_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_accelerator_state: None
) -> None:
    """A 2-node job of 4 processes each on 16-CPU machines: each process gets 16 / 4 workers, not 16 / 8."""
    from aip.accel import local_process_count

    session = Session(config_from_dict(tiny_run()), tmp_path / "run")
    monkeypatch.setattr(session.accelerator.state, "num_processes", 8)
    monkeypatch.setattr("aip.batches.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    files = [torch.zeros(3, 16, 16)]  # a data set read through workers (not one held in memory)
    assert session.loader_options(files)["num_workers"] == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_process_count(8) == 8 and session.loader_options(files)["num_workers"] == 2
