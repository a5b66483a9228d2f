"""Entry point: `python aip/train.py --config configs/debug.yaml`, or the same under `accelerate launch`.

Thin by design: parse flags, resolve the config and the run directory, hand over to the engine, and turn every
expected failure (bad config, missing data, damaged checkpoint) into one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
        "directory); auto: the newest run of this config under runs/ (or --out), else start fresh",
    )
    parser.add_argument(
        "--from-stage",
        metavar="CHECKPOINT_DIR",
        help="start a new run from a stage checkpoint (its architecture and weights) with this config",
    )
    return parser.parse_args(argv)


def _resolve(args: argparse.Namespace):
    """The config, the run directory and the checkpoint to resume or branch from."""
    from aip import checkpoint as ckpt
    from aip.config import ConfigError, load_config

    if args.resume and args.from_stage:
        raise ConfigError("--resume and --from-stage exclude each other: resume goes on in a run, from-stage branches")
    resume = branch = None
    if args.resume and args.resume != "auto":
        path = Path(args.resume)
        if (path / "meta.json").is_file() or (path / ckpt.MANIFEST).is_file():
            run_dir, resume = path.parent.parent, path
        elif (path / "config.yaml").is_file():
            run_dir, resume = path, ckpt.latest_valid(path)
            if resume is None:
                raise ConfigError(f"--resume {args.resume!r}: this run has no valid stage checkpoint yet")
        else:
            raise ConfigError(f"--resume {args.resume!r}: not a run directory (no config.yaml) nor a stage checkpoint")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        return cfg, run_dir, resume, None
    if args.config is None:
        raise ConfigError("--config is required (e.g. --config configs/debug.yaml), except with --resume DIR")
    cfg = load_config(args.config, args.overrides)
    if args.resume == "auto":
        candidates = [Path(args.out)] if args.out else ckpt.find_run_dirs(Path("runs"), cfg.name)
        for run_dir in candidates:
            found = ckpt.latest_valid(run_dir)
            if found is not None:
                return load_config(run_dir / "config.yaml", args.overrides), run_dir, found, None
    if args.from_stage:
        branch = Path(args.from_stage)
        ckpt.read(branch)  # fails early, with its reason, on a missing or damaged checkpoint
    return cfg, None, None, branch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from aip.checkpoint import CheckpointError
    from aip.config import ConfigError
    from aip.prune.pruner import PruningError
    from aip.registry import UnknownNameError

    expected = (ConfigError, UnknownNameError, CheckpointError, PruningError)
    try:
        cfg, run_dir, resume, branch = _resolve(args)
        if run_dir is None:
            run_dir = Path(args.out or cfg.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            from aip.engine import CPU_ONLY

            state = PartialState(cpu=CPU_ONLY)
            if state.num_processes > 1:  # every rank must write into the directory rank 0 named
                box = [str(run_dir)]
                broadcast_object_list(box)
                run_dir = Path(box[0])
        from aip.engine import Engine, RankMismatchError

        expected = (*expected, RankMismatchError)
        engine = Engine(cfg, run_dir)
        if cfg.mode == "train":
            engine.run_train()
        elif cfg.mode == "acp":
            if branch is not None:
                raise ConfigError("--from-stage branches an AIP run; mode acp searches its structure from the teacher")
            engine.run_acp(resume=resume)
        else:
            engine.run_aip(resume=resume, branch=branch)
    except expected as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
