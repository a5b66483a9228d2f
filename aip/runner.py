"""One job from a resolved config to its end, for the command line and the Python API alike: checks, the
run directory (named, locked, checked or emptied), the session, the method, and the lock released."""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch import nn

from aip import checkpoint as ckpt
from aip import rundir
from aip.accel import CPU_ONLY, mixed_precision, process_group_kwargs
from aip.checks import check_names
from aip.config import Config, ConfigError
from aip.data import DataBundle
from aip.methods import run_method
from aip.session import Outcome, Session


def run_of(resume: str | Path, flag: str = "resume") -> tuple[Path, Path | None]:
    """(run directory, checkpoint) a resume path names: a stage checkpoint, or a run directory and its newest valid
    checkpoint (None when it has none yet)."""
    path = Path(resume)
    if (path / "meta.json").is_file() or (path / ckpt.MANIFEST).is_file():
        return path.parent.parent, path
    if (path / rundir.CONFIG_FILE).is_file():
        return path, ckpt.latest_valid(path)
    raise ConfigError(f"{flag} {str(resume)!r}: not a run directory (no config.yaml) nor a stage checkpoint")


def resolve(
    cfg: Config, out: str | Path | None, resume: str | Path | None, flag: str = "resume"
) -> tuple[Path | None, bool, Path | None]:
    """(run directory or None for a new one, whether it holds a run to go on with, checkpoint to resume from).

    `resume`: None starts a new run in `out`; "auto" goes on in `out` (or the newest run of cfg's name under runs/)
    when it holds this config's run, else starts afresh; a path names a run directory or a stage checkpoint.
    Only this run: never an older or another config's run. `flag` names the option in error messages."""
    if resume is None:
        return (Path(out) if out else None), False, None
    if str(resume) != "auto":
        run_dir, found = run_of(resume, flag)
        rundir.check_same_config(run_dir, cfg, f"{flag} {resume}")
        return run_dir, True, found
    run_dir = Path(out) if out else rundir.newest_run(Path("runs"), cfg.name)
    if run_dir is not None and (run_dir / rundir.CONFIG_FILE).is_file():
        rundir.check_same_config(run_dir, cfg, f"{flag} auto")
        found = ckpt.latest_valid(run_dir)
        if found is not None or out:  # `out` names this run's own directory: go on in it, even from 0
            return run_dir, True, found
    return (Path(out) if out else None), False, None


def _claim(state: PartialState, run_dir: Path, cfg: Config, existing: bool, overwrite: bool) -> rundir.RunLock | None:
    """Rank 0 locks the run directory (and checks or empties it for a new run); every rank learns the outcome."""
    held = error = None
    if state.is_main_process:
        try:
            held = rundir.claim(run_dir, cfg, existing, overwrite)
        except rundir.RunDirError as exc:
            error = str(exc)
    if state.num_processes > 1:
        box = [error]
        broadcast_object_list(box)
        error = box[0]
    if error is not None:
        raise rundir.RunDirError(error)
    return held


def execute(
    cfg: Config,
    run_dir: Path | None,
    existing: bool = False,
    resume: Path | None = None,
    branch: Path | None = None,
    overwrite: bool = False,
    model: nn.Module | None = None,
    data: DataBundle | None = None,
) -> Outcome:
    """Run `cfg.mode` in `run_dir` (None: a new runs/<name>-<time>); `model`, `data`: objects in place of the
    config's model and data set."""
    check_names(cfg, dataset=data is None)  # registry names and the data set's files, before a directory is claimed
    if cfg.mode == "eval" and model is None and cfg.model.teacher_checkpoint is None:
        raise ConfigError("model.teacher_checkpoint: required in mode eval (the weights to evaluate)")
    if cfg.mode == "eval" and (resume is not None or branch is not None):
        raise ConfigError("mode eval measures model.teacher_checkpoint; it takes no --resume or --from-stage")
    mixed_precision(cfg)  # a config that contradicts the launcher's precision stops here, before any work
    state = PartialState(cpu=CPU_ONLY, **process_group_kwargs(cfg))
    if run_dir is None:
        run_dir = Path(cfg.out or rundir.new_run_dir(Path("runs"), cfg.name))
        if state.num_processes > 1:  # every rank must write into the directory rank 0 named
            box = [str(run_dir)]
            broadcast_object_list(box)
            run_dir = Path(box[0])
    held = _claim(state, run_dir, cfg, existing, overwrite)
    session = None
    try:
        session = Session(cfg, run_dir, data=data, model=model)
        outcome = run_method(session, resume=resume, branch=branch)
        outcome.run_dir = run_dir
        return outcome
    finally:
        if session is not None:
            session.close()
        if held is not None:
            held.release()
