"""Entry point: `python aip/train.py --config configs/debug.yaml`, or the same under `accelerate launch`.

Thin by design: parse flags, resolve the config and the run directory, hand over to `aip.runner`, and turn every
expected failure (bad config, missing data, damaged checkpoint) into one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never its modules as top-level names
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aip/train.py", description="Prune a CNN interval by interval and recover it by adversarial distillation."
    )
    parser.add_argument("--config", help="YAML recipe, e.g. configs/debug.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set train.lr=0.05 prune.target_flops_ratio=0.5",
    )
    parser.add_argument("--out", help="run directory (default runs/<config name>-<time>)")
    parser.add_argument(
        "--resume",
        metavar="DIR|auto",
        help="go on from the newest valid stage checkpoint of a run directory (or from one stage's checkpoint "
        "directory), with that run's config; auto: the newest run of this config's name under runs/ (or --out), "
        "else a new run",
    )
    parser.add_argument(
        "--from-stage",
        metavar="CHECKPOINT_DIR",
        help="start a new run from a stage checkpoint (its architecture and weights) with this config",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run directory that already holds a run: its old contents are removed first",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (--config, --set; else the defaults) as YAML with every key's meaning, "
        "and exit without running anything",
    )
    return parser.parse_args(argv)


def print_config(args: argparse.Namespace) -> int:
    """`--print-config`: the resolved config, each key with its meaning, on stdout; no run directory is touched."""
    from aip.checks import check_names
    from aip.config import ConfigError, load_config
    from aip.config_doc import render_config
    from aip.registry import UnknownNameError

    try:
        if args.resume or args.from_stage:
            raise ConfigError("--print-config prints --config with --set; it takes no --resume or --from-stage")
        cfg = load_config(args.config, args.overrides)
        check_names(cfg, dataset=False)  # the names; the data set's files need not be here to read its config
    except (ConfigError, UnknownNameError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    sys.stdout.write(render_config(cfg))
    return 0


def _resolve(args: argparse.Namespace):
    """The config, the run directory and the checkpoint to resume or branch from.

    The run directory is None for a new run (named by the caller); otherwise it is an existing run of this config,
    which the run goes on in: from its newest valid checkpoint, or from the start when it has none yet.
    """
    from aip import checkpoint as ckpt
    from aip import rundir
    from aip.config import ConfigError, load_config
    from aip.runner import resolve, run_of

    if args.resume and args.from_stage:
        raise ConfigError("--resume and --from-stage exclude each other: resume goes on in a run, from-stage branches")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: overwrite starts the run directory afresh")
    if args.resume and args.resume != "auto":
        run_dir, _ = run_of(args.resume, "--resume")
        cfg = load_config(args.config or run_dir / rundir.CONFIG_FILE, args.overrides)
        run_dir, _, resume = resolve(cfg, None, args.resume, "--resume")
        if resume is None:
            print(f"{run_dir} has no valid stage checkpoint yet: starting that run over in it")
        return cfg, run_dir, resume, None
    if args.config is None:
        raise ConfigError("--config is required (e.g. --config configs/debug.yaml), except with --resume DIR")
    cfg = load_config(args.config, args.overrides)
    run_dir, existing, found = resolve(cfg, args.out, args.resume, "--resume")
    if existing:
        return cfg, run_dir, found, None
    branch = None
    if args.from_stage:
        branch = Path(args.from_stage)
        ckpt.read(branch)  # fails early, with its reason, on a missing or damaged checkpoint
    return cfg, None, None, branch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    from aip.checkpoint import CheckpointError
    from aip.config import ConfigError
    from aip.guards import NonFiniteError
    from aip.images import DataError
    from aip.methods.processes import RankMismatchError
    from aip.prune.pruner import PruningError
    from aip.registry import UnknownNameError
    from aip.runner import execute

    expected = (
        ConfigError,
        UnknownNameError,
        CheckpointError,
        PruningError,
        DataError,
        NonFiniteError,
        RankMismatchError,
    )
    try:
        cfg, run_dir, resume, branch = _resolve(args)
        existing = run_dir is not None
        if run_dir is None and args.out:
            run_dir = Path(args.out)
        execute(cfg, run_dir, existing, resume=resume, branch=branch, overwrite=args.overwrite)
    except expected as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {exc.filename or 'writing'}: {exc.strerror}; free some space and resume", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
