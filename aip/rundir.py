"""Run directories: each belongs to one config, and only one run works in it at a time.

A run directory is owned by the config that started it (its `config.yaml`, written once, never rewritten by a
resume). Starting a run in a directory that already holds one is refused unless `--overwrite` empties it first;
resuming compares the saved config with the requested one and refuses any difference that changes the result
(`NEUTRAL_KEYS` may differ). While a run works in a directory, rank 0 holds an exclusive `flock` on `run_dir/.lock`;
the kernel releases it when the process ends, crashed or not, so a stale lock never blocks a later run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import time
from pathlib import Path
from typing import IO, Any

import yaml

from aip.config import Config, ConfigError

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Keys that change how a run logs, checkpoints or loads data, never what it computes: a resume may change them,
# and they do not make a directory another config's.
NEUTRAL_KEYS = (
    "name",
    "out",
    "train.log_every",
    "checkpoint.keep",
    "checkpoint.every_n_steps",
    "data.num_workers",
    "data.eval_batch_size",
    "logging",  # where the scalars go
    "export",  # which files the final model is written as: a resume of a finished run writes the missing ones
)
_STAMP = "%Y%m%d-%H%M%S"
# A file or directory written under a temporary name and renamed into place when complete: `<name>.tmp`,
# `.<stem>.<pid>.tmp.<suffix>` (aip/checkpoint.py, aip/export.py, the teacher and ACP's swarm file).
_TEMPORARY = re.compile(r".+\.tmp(?:\.[A-Za-z0-9]+)?")


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked: locked, another config's, not empty, not writable."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a flat dict over the current defaults (a key added since then reads as its default)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: cannot be read ({' '.join(str(exc).split())})") from None
    if not isinstance(loaded, dict):
        raise RunDirError(f"{path}: not a run config (the top level must be a mapping)")
    return {**_flatten(dataclasses.asdict(Config())), **_flatten(loaded)}


def differences(run_dir: Path, cfg: Config) -> list[str]:
    """`key: saved -> requested` for every key that changes the result, sorted; empty when the run is cfg's."""
    saved = saved_config(run_dir)
    wanted = _flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))  # the same types as a saved config
    keys = sorted(k for k in set(saved) | set(wanted) if not _neutral(k))
    missing = "(unset)"
    return [
        f"{k}: {saved.get(k, missing)!r} -> {wanted.get(k, missing)!r}"
        for k in keys
        if saved.get(k, missing) != wanted.get(k, missing)
    ]


def _summary(diffs: list[str], limit: int = 4) -> str:
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def check_same_config(run_dir: Path, cfg: Config, what: str) -> None:
    """Refuse to go on with a run whose saved config differs from `cfg` in a key that changes the result."""
    diffs = differences(run_dir, cfg)
    if diffs:
        raise RunDirError(
            f"{what}: the run in {run_dir} has another config ({_summary(diffs)}); a resume keeps the run's "
            "settings, so drop these changes, or start a new run with another --out"
        )


class RunLock:
    """An exclusive lock on a run directory; `release` (or the end of the process) frees it."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path, self._handle = path, handle

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def lock(run_dir: Path) -> RunLock:
    """Create `run_dir` if needed and lock it for this process, or stop with one line naming the holder."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunDirError(f"--out {str(run_dir)!r}: cannot create or write the run directory ({reason})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(
            f"run directory {run_dir} is in use by another run (pid {holder}); wait for it to end, or choose "
            "another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(run_dir / LOCK_FILE, handle)


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in Path(run_dir).iterdir() if p.name != LOCK_FILE]


def prepare_fresh(run_dir: Path, cfg: Config, overwrite: bool) -> None:
    """Make sure a new run starts in an empty directory: refuse one that holds a run, or empty it with --overwrite.

    Only a directory that holds an aip run (a config.yaml) is ever emptied; anything else is refused whole.
    """
    run_dir = Path(run_dir)
    contents = _contents(run_dir)
    if not contents:
        return
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(
            f"--out {run_dir}: the directory is not empty and holds no aip run (no config.yaml); choose another --out"
        )
    if overwrite:
        for path in contents:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    try:
        diffs = differences(run_dir, cfg)
    except RunDirError:
        diffs = ["an unreadable config.yaml"]
    if diffs:
        raise RunDirError(
            f"--out {run_dir} holds a run of another config ({_summary(diffs)}); choose another --out, or add "
            "--overwrite to replace that run"
        )
    raise RunDirError(
        f"--out {run_dir} already holds a run of this config; add --resume {run_dir} to go on with it, or "
        "--overwrite to start it afresh"
    )


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written under a temporary name: `.stage-NN[-step-S].tmp` checkpoint
    directories, `.model_pruned.<pid>.tmp.pt2` exports (named after a process that no longer exists), `teacher.pt.tmp`.

    Only the run that holds the directory's lock calls this, so no live process is writing any of them."""
    run_dir = Path(run_dir)
    found = [
        p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.iterdir() if _TEMPORARY.fullmatch(p.name)
    ]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def claim(run_dir: Path, cfg: Config, existing: bool, overwrite: bool) -> RunLock:
    """Lock `run_dir` for this run; a new run (`existing` false) also needs it empty, or emptied by --overwrite, and
    a run that goes on in it (`existing`) first removes the temporaries a killed run left there."""
    held = lock(run_dir)
    try:
        if existing:
            remove_temporaries(run_dir)
        else:
            prepare_fresh(run_dir, cfg, overwrite)
    except BaseException:
        held.release()
        raise
    return held


def _run_name(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"-(\d{8}-\d{6})(?:-(\d+))?")


def new_run_dir(runs_root: Path, name: str) -> Path:
    """`runs_root/<name>-<time>`, with `-2`, `-3`... when a run of the same second already has that name."""
    base = Path(runs_root) / f"{name}-{time.strftime(_STAMP)}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def newest_run(runs_root: Path, name: str) -> Path | None:
    """The newest run directory of config `name` (named `<name>-<time>` under runs_root), or None.

    Only runs of exactly this name count: `debug` never picks `debug_acp-...`, nor `debug-x-...`.
    """
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        return None
    pattern = _run_name(name)
    found = []
    for path in runs_root.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (path / CONFIG_FILE).is_file():
            found.append(((match.group(1), int(match.group(2) or 1)), path))
    return max(found)[1] if found else None
