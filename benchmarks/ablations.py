"""Ablations of the full AIP arm (d_aip) of the quality benchmark: which setting of each loss term pays?

    python benchmarks/ablations.py [--target 0.3] [--seeds N] [--only NAME ...] [--model resnet20] [--data DIR]

Every variant is arm d_aip of benchmarks/quality.py (published teacher, lossless CIFAR-10, the same subset, epochs,
data order and seeds) with one setting changed; the baseline is d_aip itself, whose runs the quality benchmark has
usually cached already (same key: same resolved config, teacher file, aip/ code and library versions). For each
variant: top-1 per seed, mean and std, and the paired difference to d_aip of the same seed (a win or a loss only
beyond twice its standard error). Variants run in the order below, the likeliest to matter first; the results files
are rewritten after each one, so a cut-short sitting still reports the variants it finished.
Results: <out>/ablations-t<target>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import (
    MODELS,
    REPO,
    SETTINGS,
    SHARED,
    cache_key_parts,
    code_version,
    fail,
    find_data,
    merge,
    recovery_epochs,
    run_arm,
)
from quality import arm_config as quality_arm
from quality_peers import peer_args, run_peer, write_subset
from quality_report import describe, fmt, paired
from quality_runs import LEDGER

# On top of d_aip (ce 0.7, kd 0.3 at T=4, at 1000 at layer1-3 under schedule after_prune, adv 1.0; D on the taps'
# pooled attention maps, [128, 256, 128], Adam 1e-4; 1 discriminator update per student update; recovery SGD lr
# 0.01, cosine per stage).
# The variants skip the per-epoch evaluations of the recovery curve, which only observe (tests/test_curves.py: the
# stage rows are identical without them); about a third of a variant's time on ResNet-20.
QUIET = {"train": {"eval_each_epoch": False}}
VARIANTS: dict[str, tuple[str, dict]] = {
    "at_0": ("no attention transfer (kd + adv)", {"loss": {"at": {"weight": 0.0}}}),
    "at_100": ("attention transfer weight 100", {"loss": {"at": {"weight": 100.0}}}),
    "disc_softmax": ("discriminator on softmax outputs", {"disc": {"input": "softmax"}}),
    "disc_logits": ("discriminator on logits", {"disc": {"input": "logits"}}),
    "disc_steps_5": ("5 discriminator updates per student update", {"disc": {"steps": 5}}),
    "lr_0.05": ("recovery lr 0.05", {"train": {"lr": 0.05}}),
    "kd_T2": ("KD temperature 2", {"loss": {"kd": {"temperature": 2.0}}}),
    "disc_lr_1e-3": ("discriminator Adam lr 1e-3", {"disc": {"lr": 1e-3}}),
    "at_last": ("attention transfer at layer3 only", {"model": {"taps": ["layer3"]}}),
    "disc_narrow": ("discriminator hidden [64]", {"disc": {"hidden": [64]}}),
    "kd_0.7": ("KD weight 0.7, CE 0.3", {"loss": {"kd": {"weight": 0.7}, "ce": {"weight": 0.3}}}),
    "lr_step": ("recovery lr schedule step", {"train": {"scheduler": "step"}}),
    "assistant": (
        "teacher assistant: each stage after the first learns from the student the previous stage left",
        {"loss": {"teacher": "assistant"}},
    ),
    "at_deep": ("attention transfer at layer2 and layer3 only", {"model": {"taps": ["layer2", "layer3"]}}),
    "at_lr": ("attention transfer's weight follows the learning rate", {"loss": {"at": {"schedule": "lr"}}}),
    "at_ramp": (
        "attention transfer's weight mirrors the learning rate (none after a prune, full at a stage's end)",
        {"loss": {"at": {"schedule": "ramp"}}},
    ),
    "at_constant": (
        "attention transfer's weight constant in every stage (no ramp after a prune, no warm-up in the fine-tune)",
        {"loss": {"at": {"schedule": "constant"}}},
    ),
    "sparsity_1": (
        "1 epoch of sparsity training (group-norm, reg 5e-4) before the first prune, 1 fine-tune epoch less",
        {"prune": {"sparsity": {"epochs": 1, "weight": 5e-4}, "finetune_epochs": 1}},
    ),
    "sparsity_1_strong": (
        "1 epoch of sparsity training (group-norm, reg 0.1) before the first prune, 1 fine-tune epoch less",
        {"prune": {"sparsity": {"epochs": 1, "weight": 0.1}, "finetune_epochs": 1}},
    ),
    "assistant_at_lr": (
        "teacher assistant and attention transfer following the learning rate",
        {"loss": {"teacher": "assistant", "at": {"schedule": "lr"}}},
    ),
}


def markdown(out: dict) -> list[str]:
    base = out["baseline"]
    lines = [
        f"# Ablations of full AIP (d_aip) at {float(out['target']):.0%} FLOPs, {out['teacher']}",
        "",
        f"Command: `{out['command']}`; {out['machine']}; code aip/ tree {out['code']['aip_tree'][:10]} "
        f"(commit {out['code']['commit'][:10]}). Settings as benchmarks/quality.py's default run; seeds "
        f"{out['seeds']}. A win/loss: a two-sided paired t-test against d_aip gives p < 0.05; the last column pairs "
        "each variant with the Torch-Pruning + KD peer (p_tp_kd, cached runs of benchmarks/quality.py) the same way.",
        "",
        "| variant | change | top-1 mean | std | per seed | vs d_aip: mean | std | SE | p | call | vs p_tp_kd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| d_aip | (baseline) | {describe(base)['mean']:.2f} | {fmt(describe(base)['std'])} "
        f"| {', '.join(f'{v:.2f}' for v in base)} | - | - | - | - | - | {vs_peer(base, out.get('peer'))} |",
    ]
    for name, v in out["variants"].items():
        d, p = describe(v["top1"]), v["vs_d_aip"]
        per_seed = ", ".join(f"{x:.2f}" for x in v["top1"])
        lines.append(
            f"| {name} | {v['change']} | {d['mean']:.2f} | {fmt(d['std'])} | {per_seed} "
            f"| {fmt(p['mean'], True)} | {fmt(p['std'])} | {fmt(p['se'])} "
            f"| {'-' if p.get('p') is None else format(p['p'], '.3f')} | {p['call']} "
            f"| {vs_peer(v['top1'], out.get('peer'))} |"
        )
    return lines


def vs_peer(values: list[float], peer: list[float] | None) -> str:
    """The paired difference to the peer over the same seeds, with its t-test's p and call; '-' without the peer."""
    if not peer or len(peer) != len(values):
        return "-"
    p = paired(values, peer)
    return f"{fmt(p['mean'], True)} (p {'-' if p.get('p') is None else format(p['p'], '.3f')}) {p['call']}"


def peer_top1(args: argparse.Namespace, s: dict, data: Path, weights: Path, key_parts: dict) -> list[float] | None:
    """p_tp_kd's top-1 per seed at this target, from the quality benchmark's cache (never run here); None when a
    seed is missing."""
    work = Path(args.work)
    subset = write_subset(data, s["subset"], work)
    found = []
    for seed in range(args.seeds):
        pa = peer_args("p_tp_kd", args.model, s, float(args.target), seed)
        label = f"{args.model}-p_tp_kd-t{args.target}-s{seed}"
        done = run_peer(pa, weights, data, subset, key_parts, work, label, dry=True, ledger=LEDGER)
        if done is None:
            return None
        found.append(done["top1"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["0.5", "0.3"], default="0.3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder tree with train/ and test/ (default ~/.cache/aip/cifar10)")
    parser.add_argument("--weights", default=str(SHARED / "weights"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work", default=str(REPO / "benchmarks" / ".cache" / "quality"))
    args = parser.parse_args()
    if args.seeds < 2:
        fail("--seeds must be at least 2 for paired statistics")
    code = code_version()
    model = MODELS[args.model]
    weights = Path(args.weights) / model["weights"]
    if not weights.is_file():
        fail(f"no published teacher at {weights}; pass --weights DIR (the folder of ../shared/weights)")
    data = find_data(args.data)
    s = {**SETTINGS[False], "recovery_epochs": recovery_epochs(SETTINGS[False])}
    seeds, target, work = list(range(args.seeds)), float(args.target), Path(args.work)
    key_parts = cache_key_parts(code, weights)
    import torch

    def top1(cfg: dict, label: str) -> float:
        done = run_arm(cfg, key_parts, work, label, ledger=LEDGER)
        if "refused" in done:
            fail(f"{label}: {done['refused']}")
        print(f"{label}: top-1 {done['report']['stages'][-1]['top1']:.2f}", flush=True)
        return done["report"]["stages"][-1]["top1"]

    started = time.perf_counter()
    base_cfgs = [quality_arm("d_aip", model, weights, data, s, target, seed) for seed in seeds]
    baseline = [
        top1(cfg, f"{args.model}-d_aip-t{args.target}-s{seed}") for cfg, seed in zip(base_cfgs, seeds, strict=True)
    ]
    out = {
        "command": "python benchmarks/ablations.py"
        + f" --target {args.target} --seeds {args.seeds}"
        + (f" --only {' '.join(args.only)}" if args.only else ""),
        "teacher": f"published CIFAR {args.model}",
        "target": args.target,
        "seeds": seeds,
        "baseline": baseline,
        "peer": peer_top1(args, s, data, weights, key_parts),
        "variants": {},
        "code": code,
        "machine": f"{sys.platform} CPU, {torch.get_num_threads()} torch threads",
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    for name in args.only or VARIANTS:
        change, extra = VARIANTS[name]
        values = [
            top1(merge(merge(cfg, QUIET), extra), f"{args.model}-abl_{name}-t{args.target}-s{seed}")
            for cfg, seed in zip(base_cfgs, seeds, strict=True)
        ]
        out["variants"][name] = {
            "change": change,
            "overrides": extra,
            "top1": values,
            "vs_d_aip": paired(values, baseline),
        }
        out["wall_seconds"] = time.perf_counter() - started
        (dest / f"ablations-t{args.target}.json").write_text(json.dumps(out, indent=1))
        lines = markdown(out)
        (dest / f"ablations-t{args.target}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
