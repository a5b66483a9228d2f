"""Effective filter analysis of a trained network: `python -m aip.analyze --config CONFIG --checkpoint PATH`.

Prints, per prunable layer group, its width, effective rank and estimated maximum prunable ratio (see
aip/prune/capacity.py for the rule), then the estimated maximum compression of the whole network (every group
pruned to its limit by L1 norm), and writes a PNG bar chart. PATH is a teacher or model file (`model.pt`,
`teacher.pt`, a bare state dict) or a stage checkpoint directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from aip.session import Session


def _load(session: Session, path: Path) -> torch.nn.Module:
    """The model in a weights file, or the pruned student of a stage checkpoint (history replayed, weights loaded)."""
    from aip import checkpoint as ckpt
    from aip.prune.restore import rebuild

    if path.is_dir():
        history, _ = ckpt.read(path)
        model = session.new_model()
        return rebuild(model, session.task.prunable(model, session.example), history, path)
    return session.load_weights(path)


def analyze(config: str, checkpoint: str, overrides: list[str], out: str | None) -> int:
    from aip.config import ConfigError, load_config
    from aip.methods.processes import calibration
    from aip.models import classifier_of
    from aip.prune.capacity import estimate_capacity
    from aip.prune.cost import model_cost
    from aip.prune.importance import create_importance
    from aip.prune.pruner import ChannelPruner
    from aip.session import Session

    cfg = load_config(config, overrides)
    if cfg.task != "classification":
        raise ConfigError("task: the capacity analysis covers classification only, not task detection yet")
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint!r}: no such file or directory")
    out_dir = Path(out) if out else (path if path.is_dir() else path.parent).parent / "analysis"
    session = Session(cfg, out_dir)
    model = _load(session, path).to(session.accelerator.device)
    example = session.example.to(session.accelerator.device)
    pruner = ChannelPruner(model, example, [classifier_of(model)], cfg.prune.max_layer_ratio)
    cap = cfg.prune.capacity
    found = estimate_capacity(model, pruner.root_modules(), calibration(session, 0, cap.batches), cap.tau, cap.safety)

    probe = copy.deepcopy(model)
    probe_pruner = ChannelPruner(probe, example, [classifier_of(probe)], max_layer_ratio=0.999)
    probe_pruner.set_capacity({n: c.max_ratio for n, c in found.items()})
    before = model_cost(model, example)
    try:
        probe_pruner.prune_to(0.0, "flops", create_importance("l1"))  # as far as every limit allows
    except Exception as exc:  # noqa: BLE001 - stopping at the limits is the expected way out
        if "cannot reach the target" not in str(exc):
            raise
    after = model_cost(probe, example)

    lines = [
        f"effective filter analysis: tau={cap.tau}, safety={cap.safety}, {cap.batches} batches of "
        f"{cfg.data.batch_size}",
        "",
        "| layer group | width | effective rank | max prunable ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {c.width} | {c.effective_rank} | {c.max_ratio:.3f} |" for n, c in found.items()]
    lines += [
        "",
        f"estimated maximum compression: FLOPs {after.flops / before.flops:.3f} of the original "
        f"({1 - after.flops / before.flops:.1%} removed), parameters {after.params / before.params:.3f} "
        f"({1 - after.params / before.params:.1%} removed)",
    ]
    report = "\n".join(lines)
    print(report)
    if session.main:
        (out_dir / "capacity.md").write_text(report + "\n")
        (out_dir / "capacity.json").write_text(
            json.dumps(
                {
                    "layers": {n: c.__dict__ for n, c in found.items()},
                    "max_compression": {"flops": after.flops / before.flops, "params": after.params / before.params},
                },
                indent=1,
            )
        )
        _plot(found, out_dir / "capacity.png")
        print(f"\nwrote {out_dir / 'capacity.md'}, capacity.json and capacity.png")
    return 0


def _plot(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(found)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(names)), 6), sharex=True)
    x = range(len(names))
    top.bar(x, [found[n].width for n in names], color="#bbbbbb", label="width")
    top.bar(x, [found[n].effective_rank for n in names], color="#3b75af", label="effective rank")
    top.set_ylabel("channels")
    top.legend()
    bottom.bar(x, [found[n].max_ratio for n in names], color="#c44e52")
    bottom.set_ylabel("max prunable ratio")
    bottom.set_ylim(0, 1)
    bottom.set_xticks(list(x), names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aip.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's YAML (model, data, prune.capacity settings)")
    parser.add_argument("--checkpoint", required=True, help="a model/teacher file or a stage checkpoint directory")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="where to write capacity.md/.json/.png (default: analysis/ beside the run)")
    args = parser.parse_args(argv)
    from aip.checkpoint import CheckpointError
    from aip.config import ConfigError

    try:
        return analyze(args.config, args.checkpoint, args.overrides, args.out)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
