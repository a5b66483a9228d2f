"""Run directories: one config per directory (refused, or replaced with --overwrite), resume refuses a changed
config and never rewrites config.yaml, `--resume auto` never picks another run, and one run at a time (a lock)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aip import checkpoint as ckpt
from aip import rundir
from aip.config import config_from_dict, save_config
from aip.train import _resolve, main, parse_args
from tests.conftest import tiny_run

QUICK = {
    "train.teacher_epochs": 1,
    "prune.intervals": 1,
    "prune.finetune_epochs": 0,
    "data.train_size": 64,
    "data.val_size": 32,
}


def _config(tmp_path: Path, name: str = "tiny.yaml", **overrides) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_run(**{**QUICK, **overrides})))
    return path


def _fake_run(run_dir: Path, **overrides) -> Path:
    """A run directory as a run of `tiny_run(**overrides)` leaves it: config, teacher, a stage checkpoint, report."""
    run_dir.mkdir(parents=True)
    save_config(config_from_dict(tiny_run(**{**QUICK, **overrides})), run_dir / "config.yaml")
    (run_dir / "teacher.pt").write_bytes(b"an old teacher")
    (run_dir / "report.json").write_text("{}")
    tmp = ckpt.begin(run_dir, 1)
    (tmp / ckpt.STATE_DIR).mkdir()
    (tmp / ckpt.STATE_DIR / "model.safetensors").write_bytes(b"weights")
    ckpt.commit(tmp, run_dir, 1, [], {"stage": 1, "state": {}})
    return run_dir


def test_neutral_keys_may_differ_the_others_may_not(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "run")
    neutral = {
        "train.log_every": 7,
        "checkpoint.keep": 2,
        "data.num_workers": 2,
        "data.eval_batch_size": 16,
        "name": "renamed",
        "out": "elsewhere",
    }
    assert rundir.differences(run_dir, config_from_dict(tiny_run(**{**QUICK, **neutral}))) == []
    changed = config_from_dict(tiny_run(**{**QUICK, "train.lr": 0.1, "seed": 3}))
    assert rundir.differences(run_dir, changed) == ["seed: 0 -> 3", "train.lr: 0.05 -> 0.1"]


def test_a_new_run_into_a_directory_of_another_config_is_refused(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "run", **{"train.lr": 0.2})
    config = _config(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(rundir.RunDirError, match=r"another config \(train.lr: 0.2 -> 0.05\).*--overwrite"):
        rundir.claim(run_dir, config_from_dict(yaml.safe_load(config.read_text())), existing=False, overwrite=False)
    assert main(["--config", str(config), "--out", str(run_dir)]) == 2
    assert (run_dir / "config.yaml").read_bytes() == before
    assert (run_dir / "teacher.pt").read_bytes() == b"an old teacher"


def test_a_new_run_of_the_same_config_suggests_resume_or_overwrite(tmp_path: Path, capsys) -> None:
    run_dir = _fake_run(tmp_path / "run")
    assert main(["--config", str(_config(tmp_path)), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "already holds a run of this config" in err[0] and f"--resume {run_dir}" in err[0]
    assert "--overwrite" in err[0]


def test_overwrite_starts_afresh_in_an_emptied_directory(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "run", **{"train.lr": 0.2})
    (run_dir / "checkpoints" / "stage-07").mkdir()
    assert main(["--config", str(_config(tmp_path)), "--out", str(run_dir), "--overwrite"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["stage-01"]
    assert (run_dir / "teacher.pt").read_bytes() != b"an old teacher"  # trained anew, not reused
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.05
    assert len(yaml.safe_load((run_dir / "report.json").read_text())["stages"]) == 1


def test_overwrite_never_empties_a_directory_that_holds_no_run(tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert main(["--config", str(_config(tmp_path)), "--out", str(other), "--overwrite"]) == 2
    assert (other / "thesis.tex").read_text() == "precious"


def test_resume_refuses_a_changed_config_and_never_rewrites_config_yaml(tmp_path: Path, capsys) -> None:
    run_dir = _fake_run(tmp_path / "run")
    before = (run_dir / "config.yaml").read_bytes()
    assert main(["--resume", str(run_dir), "--set", "train.lr=0.1"]) == 2
    assert "has another config (train.lr: 0.05 -> 0.1)" in capsys.readouterr().err
    changed = _config(tmp_path, "changed.yaml", **{"prune.target_flops_ratio": 0.4})
    assert main(["--config", str(changed), "--resume", str(run_dir)]) == 2
    assert main(["--config", str(changed), "--resume", "auto", "--out", str(run_dir)]) == 2
    assert (run_dir / "config.yaml").read_bytes() == before
    args = parse_args(["--resume", str(run_dir), "--set", "train.log_every=1", "checkpoint.keep=1"])
    cfg, found_dir, resume, branch = _resolve(args)  # neutral keys: allowed
    assert (found_dir, resume, branch) == (run_dir, ckpt.stage_dir(run_dir, 1), None)
    assert cfg.train.log_every == 1


def test_resume_auto_takes_only_the_newest_run_of_this_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    older = _fake_run(Path("runs") / "tiny-20240101-000000")
    _fake_run(Path("runs") / "tiny-extra-20250101-000000")  # another config name that starts alike
    args = parse_args(["--config", str(config), "--resume", "auto"])
    assert _resolve(args)[1:3] == (older, ckpt.stage_dir(older, 1))
    newest = Path("runs") / "tiny-20240102-000000"  # crashed before its first checkpoint
    newest.mkdir()
    save_config(config_from_dict(tiny_run(**QUICK)), newest / "config.yaml")
    assert _resolve(args)[1:] == (None, None, None)  # a new run in a new directory, not the older run
    save_config(config_from_dict(tiny_run(**{**QUICK, "seed": 5})), newest / "config.yaml")
    with pytest.raises(rundir.RunDirError, match="--resume auto: the run in .*tiny-20240102-000000 has another"):
        _resolve(args)


def test_resume_falls_back_past_a_checkpoint_without_meta(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "run")
    tmp = ckpt.begin(run_dir, 2)
    (tmp / ckpt.STATE_DIR).mkdir()
    (tmp / ckpt.STATE_DIR / "model.safetensors").write_bytes(b"weights")
    ckpt.commit(tmp, run_dir, 2, [], {"stage": 2, "state": {}})
    (ckpt.stage_dir(run_dir, 2) / "meta.json").unlink()
    ckpt.write_manifest(ckpt.stage_dir(run_dir, 2))
    for argv in (
        ["--resume", str(run_dir)],
        ["--config", str(_config(tmp_path)), "--resume", "auto", "--out", str(run_dir)],
    ):
        with pytest.warns(UserWarning, match="stage-02: meta.json is missing"):
            assert _resolve(parse_args(argv))[2] == ckpt.stage_dir(run_dir, 1)


def test_a_second_run_into_a_locked_directory_stops_with_one_line(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    held = rundir.lock(run_dir)
    try:
        assert main(["--config", str(_config(tmp_path)), "--out", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: run directory") and "in use by another run" in err[0]
        assert not (run_dir / "config.yaml").exists()
    finally:
        held.release()
    rundir.lock(run_dir).release()  # free again once the holder let go


def test_the_lock_goes_with_a_crashed_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = f"from aip import rundir; held = rundir.lock({str(run_dir)!r}); print('locked', flush=True); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirError, match=f"in use by another run \\(pid {proc.pid}\\)"):
            rundir.lock(run_dir)
    finally:
        proc.kill()
        proc.wait()
    rundir.lock(run_dir).release()


def test_out_under_a_regular_file_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["--config", str(_config(tmp_path)), "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "cannot create or write" in err[0]


def test_a_copy_of_a_locked_run_is_not_locked(tmp_path: Path) -> None:
    source = _fake_run(tmp_path / "run")
    held = rundir.lock(source)
    try:
        shutil.copytree(source, tmp_path / "copy")  # the .lock file comes along; the lock is the process's
        args = parse_args(["--resume", str(tmp_path / "copy")])
        cfg, run_dir, _, _ = _resolve(args)
        rundir.claim(run_dir, cfg, existing=True, overwrite=False).release()
    finally:
        held.release()
