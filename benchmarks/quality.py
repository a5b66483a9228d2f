"""Quality benchmark on real CIFAR-10: does each loss term earn its place, starting from a published teacher?

    python benchmarks/quality.py [--quick] [--seeds N] [--model resnet20|resnet56] [--data DIR] [--out DIR]
                                 [--targets 0.5 0.3] [--no-run]

No teacher is trained: the teacher is a fully trained CIFAR ResNet from ../shared/weights (pytorch-cifar-models,
ResNet-20 92.60% / ResNet-56 94.37% top-1), loaded with `model.checkpoint_rename: {".downsample.": ".shortcut."}`
and the normalisation it was trained with (`data.mean`/`data.std`, as configs/cifar10_resnet20_eval.yaml).
From it, for each target (50% and 30% of the teacher's FLOPs) and each seed, with the same criterion (L1), the same
target, the same total recovery epochs, the same data order and the same seeds, two peers and seven arms of aip's:
  p_tp_ce, p_tp_kd  the peers: a plain Torch-Pruning script (benchmarks/peers/torch_pruning_kd.py), fine-tuned with
                cross-entropy or with 0.7 CE + 0.3 logit KD (what people who prune use today),
  a_ce          prune + fine-tune with cross-entropy only (the usual Torch-Pruning workflow),
  b_kd          + distillation on the logits (KL),
  c_kd_at       + attention transfer,
  d_aip         + adversarial term (full AIP),
  e_aip_hybrid  full AIP with the hybrid criterion (L1, then similarity),
  f_acp         `mode: acp`: per-layer widths searched once, then cut towards over the same intervals and AIP
                recovery as the others (the search itself is extra: its seconds and training steps are reported
                beside the wall times),
  g_aip_capacity  full AIP with the effective-rank caps (`prune.capacity.enabled`).
Top-1 is always on the full 10,000-image test set; training uses a fixed subset (`data.train_subset`).

Statistics: mean and standard deviation over seeds per arm (5 seeds for the peers and arms a, b, d, 3 for the
others), and for each arm the paired difference to p_tp_kd and to a_ce over the seeds both ran (mean, standard
deviation, standard error, two-sided paired t-test); a win or a loss only where p < 0.05. The same paired statistics
between consecutive arms (b-a, c-b, d-c, e-d, f-d, g-d) say what each added term brings.

Data: the lossless CIFAR-10 ImageFolder tree (train/, test/), by default ~/.cache/aip/cifar10, extracted from
../shared/data/cifar10.tar.gz when missing. Results: <out>/quality.json, quality.md, quality.png (--quick:
quality-quick.*). JSON layout: {"teacher": {name, top1, ...}, "seeds": [...], "results": {"0.5": {arm: [top-1 per
seed]}, "0.3": {...}}, "runs": {target: {arm: [per-seed details]}}, "paired": {...}, "settings", "machine", ...}.
Recovery curves: every run sets `train.eval_each_epoch`, so the student is evaluated (full test set) right after
each prune and after every recovery epoch; "curves" holds {target: {arm: [[[epochs spent, top-1, 1 if just
pruned], ...] per seed]}} and <out>/quality-curves.png plots the mean over seeds (one line per arm, one panel
per target).

Caching: each arm runs through aip.train.main in a run directory of its own under --work, named by a hash of the
arm's fully resolved config (which holds target and seed), the teacher file's hash, the code version
(the git tree of aip/ at HEAD plus a hash of `git diff HEAD -- aip` and of untracked files under aip/, so commits
that leave aip/ alone keep the cache) and the installed torch, torchvision and torch-pruning versions (an upgrade
of any of them runs everything again). A run is reused
only when its key matches and its report.json is complete; a directory of the same key without a complete report
is resumed (`--resume auto`), anything else is a new directory, so no number from other code or settings is reused.
Each finished run is also recorded in benchmarks/results/ledger/ (its report and our record, a few kB, committed), so
a sitting longer than one machine's life goes on from a clean clone: a record is reused under the same key only.
A run whose pruner cannot reach the target within the method's own limits (g's effective-rank caps, the layer cap)
is recorded as refused, with aip's one-line reason, in the report and the ledger, and the sitting goes on; any other
failure stops it. Every recorded run names its machine (CPU, torch's CPU kernels and threads), and the report lists
the machines that measured its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from quality_peers import PEERS, peer_args, peer_row, run_peer, write_subset
from quality_peers import SCRIPT as SCRIPT_PATH
from quality_report import describe, markdown, paired, plot, plot_curves
from quality_runs import (
    LEDGER,
    REPO,
    SHARED,
    aip_row,
    cache_key_parts,
    code_version,
    fail,
    portable,
    portable_config,
    run_arm,
)

TARGETS = ("0.5", "0.3")
LOSSES = {
    "ce": {"ce": {"weight": 1.0}, "kd": {"weight": 0.0}, "at": {"weight": 0.0}, "adv": {"weight": 0.0}},
    "kd": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 0.0}, "adv": {"weight": 0.0}},
    "kd_at": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 1000.0}, "adv": {"weight": 0.0}},
    "aip": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 1000.0}, "adv": {"weight": 1.0}},
}
ARMS = {
    "a_ce": {"loss": LOSSES["ce"]},
    "b_kd": {"loss": LOSSES["kd"]},
    "c_kd_at": {"loss": LOSSES["kd_at"]},
    "d_aip": {"loss": LOSSES["aip"]},
    "e_aip_hybrid": {"loss": LOSSES["aip"], "prune": {"criterion": "hybrid"}},
    "f_acp": {"mode": "acp", "loss": LOSSES["aip"], "acp": {"final": "aip", "distill": True}},
    "g_aip_capacity": {"loss": LOSSES["aip"], "prune": {"capacity": {"enabled": True}}},
}
# Consecutive comparisons: what each added ingredient brings over the arm without it.
STEPS = [
    ("b_kd", "a_ce"),
    ("c_kd_at", "b_kd"),
    ("d_aip", "c_kd_at"),
    ("e_aip_hybrid", "d_aip"),
    ("f_acp", "d_aip"),
    ("g_aip_capacity", "d_aip"),
]
MODELS = {
    "resnet20": {"name": "cifar_resnet20", "weights": "cifar10_resnet20.pth", "published_top1": 92.60},
    "resnet56": {"name": "cifar_resnet56", "weights": "cifar10_resnet56.pth", "published_top1": 94.37},
}
# Default: 6 arms x 2 targets x 3 seeds = 36 runs in one sitting on 2 CPU cores (ResNet-20).
# Quick: 12 runs (1 seed, both targets), about 10 minutes.
SETTINGS = {
    False: {
        "subset": 6000,
        "batch_size": 128,
        "lr": 0.01,
        "intervals": 2,
        "between": 1,
        "finetune": 2,
        "acp": {"particles": 4, "iterations": 2, "recovery_steps": 15, "holdout_size": 1000, "calibration": 200},
    },
    True: {
        "subset": 1500,
        "batch_size": 128,
        "lr": 0.01,
        "intervals": 2,
        "between": 1,
        "finetune": 1,
        "acp": {"particles": 3, "iterations": 2, "recovery_steps": 8, "holdout_size": 500, "calibration": 200},
    },
}


def find_data(path: str | None) -> Path:
    """The lossless CIFAR-10 tree; extracted once from ../shared/data/cifar10.tar.gz when the default is missing."""
    root = Path(path).expanduser() if path else Path.home() / ".cache" / "aip" / "cifar10"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    tar = SHARED / "data" / "cifar10.tar.gz"
    if path is None and tar.is_file():
        print(f"extracting {tar} to {root} (once)", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as archive:
            archive.extractall(root, filter="data")
        return root
    fail(
        f"no CIFAR-10 tree (train/, test/) at {root}; extract the lossless copy there: "
        f"mkdir -p {root} && tar -xzf {tar} -C {root} (or pass --data DIR)"
    )
    raise AssertionError


def recovery_epochs(s: dict) -> int:
    return s["intervals"] * s["between"] + s["finetune"]


def arm_config(arm: str, model: dict, weights: Path, data: Path, s: dict, target: float, seed: int) -> dict:
    """The fully resolved config of one arm at one target and seed (what goes to aip.train.main)."""
    cfg: dict = {
        "mode": "aip",
        "seed": seed,
        "name": f"quality-{arm}",
        "model": {
            "name": model["name"],
            "teacher_checkpoint": str(weights),
            "checkpoint_rename": {".downsample.": ".shortcut."},
        },
        "data": {
            "name": "cifar10",
            "root": str(data),
            "batch_size": s["batch_size"],
            "eval_batch_size": 500,
            "num_workers": 0,
            "train_subset": s["subset"],
            "mean": [0.4914, 0.4822, 0.4465],
            "std": [0.2023, 0.1994, 0.2010],
        },
        "train": {"lr": s["lr"], "scheduler": "cosine", "log_every": 50, "eval_each_epoch": True},
        "prune": {
            "criterion": "l1",
            "target_flops_ratio": target,
            "intervals": s["intervals"],
            "epochs_between": s["between"],
            "finetune_epochs": s["finetune"],
        },
        "checkpoint": {"keep": 1},
        "export": {"formats": []},
    }
    cfg = merge(cfg, ARMS[arm])
    if cfg["mode"] == "acp":  # the same intervals and recovery; the search's settings
        a = s["acp"]
        cfg["acp"].update(
            {
                "calibration_images": a["calibration"],
                "holdout_size": a["holdout_size"],
                "recovery_steps": a["recovery_steps"],
                "swarm": {"particles": a["particles"], "iterations": a["iterations"]},
            }
        )
    return cfg


def merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else json.loads(json.dumps(v))
    return out


# Arms with the full seed count (--seeds, default 5); the others run the first 3 of those seeds.
FULL_SEEDS = ("p_tp_ce", "p_tp_kd", "a_ce", "b_kd", "d_aip")
# Report order: the peers first, then aip's arms.
ALL_ARMS = (*PEERS, *ARMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, small subset, both targets (about 10 minutes)")
    parser.add_argument("--seeds", type=int, help="seeds of the peers and arms a, b, d (default 5, the others 3)")
    parser.add_argument(
        "--from-seed", type=int, default=0, help="run only seeds from this one on (a second process takes the rest)"
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet20", help="the published teacher")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder tree with train/ and test/ (default ~/.cache/aip/cifar10)")
    parser.add_argument("--weights", default=str(SHARED / "weights"), help="folder of the published teachers")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work", default=str(REPO / "benchmarks" / ".cache" / "quality"), help="run directories")
    parser.add_argument(
        "--ledger",
        help="folder of finished runs' records, reused under the same key (default benchmarks/results/ledger;"
        " none with --quick)",
    )
    parser.add_argument("--subset", type=int, help="training images (default 6000; another budget: quality-s<N>.*)")
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, help="these arms only (the report is *-partial)")
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="run nothing: report the complete cached runs of this code (the seeds each arm finished) as *-partial",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        help="run these targets only (a report without the others is *-partial); two sittings in parallel, one per"
        " target, then --no-run, write the whole report",
    )
    args = parser.parse_args()
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    if n_seeds < 1:
        fail("--seeds must be at least 1")
    seeds_of = {arm: list(range(n_seeds if arm in FULL_SEEDS else min(3, n_seeds))) for arm in ALL_ARMS}
    arms = [a for a in ALL_ARMS if a in (args.arms or ALL_ARMS)]
    code = code_version()  # before the engine is imported: the code these runs use
    model = MODELS[args.model]
    weights = Path(args.weights) / model["weights"]
    if not weights.is_file():
        fail(f"no published teacher at {weights}; pass --weights DIR (the folder of ../shared/weights)")
    data = find_data(args.data)
    s = {**SETTINGS[args.quick]}
    if args.subset is not None:
        if args.subset < s["batch_size"]:
            fail(f"--subset must be at least one batch ({s['batch_size']} images)")
        s["subset"] = args.subset
    s["recovery_epochs"] = recovery_epochs(s)
    a = s["acp"]
    s["recovery_steps"] = s["recovery_epochs"] * (s["subset"] // s["batch_size"])
    s["acp_search_steps"] = a["particles"] * a["iterations"] * a["recovery_steps"]  # besides the recovery
    tag = "quick" if args.quick else "full"
    work = Path(args.work)
    ledger = Path(args.ledger) if args.ledger else (None if args.quick else LEDGER)
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import torch

    key_parts = cache_key_parts(code, weights)
    subset_file = write_subset(data, s["subset"], work)
    started = time.perf_counter()
    runs: dict = {t: {arm: [] for arm in arms} for t in TARGETS}
    teacher_row, missing = None, [f"{arm} (not asked for)" for arm in ALL_ARMS if arm not in arms]
    refused: dict = {}  # target -> arm -> [{seed, reason, machine}]: runs whose pruner could not reach the target
    for target in TARGETS:
        for seed in range(n_seeds):  # seed-major: a cut-short sitting still has paired arms for the seeds it reached
            for arm in (a for a in arms if seed in seeds_of[a]):
                label = f"{args.model}-{arm}-t{target}-s{seed}" + (f"-n{args.subset}" if args.subset else "")
                if target not in args.targets or seed < args.from_seed:  # left to another process
                    missing.append(label)
                    continue
                if arm in PEERS:
                    pa = peer_args(arm, args.model, s, float(target), seed)
                    done = run_peer(pa, weights, data, subset_file, key_parts, work, label, args.no_run, ledger)
                    row = None if done is None else peer_row(done)
                else:
                    cfg = arm_config(arm, model, weights, data, s, float(target), seed)
                    done = run_arm(cfg, key_parts, work, label, dry=args.no_run, ledger=ledger)
                    if done is not None and "refused" in done:
                        refused.setdefault(target, {}).setdefault(arm, []).append(
                            {"seed": seed, "reason": done["refused"], "machine": done.get("machine")}
                        )
                        print(f"{label}: refused ({done['refused']})", flush=True)
                        continue
                    row = None if done is None else aip_row(done)
                if row is None:
                    missing.append(label)
                    continue
                teacher_row = row.pop("teacher", None) or teacher_row
                runs[target][arm].append({"seed": seed, **row})
                print(f"{label}: top-1 {row['top1']:.2f} ({row['seconds']:.0f} s)", flush=True)
    runs = {t: {arm: rs for arm, rs in by_arm.items() if rs} for t, by_arm in runs.items()}
    runs = {t: by_arm for t, by_arm in runs.items() if by_arm}
    if not runs:
        fail(f"no run of this code is complete; missing: {', '.join(missing)}")
    if teacher_row is None:  # peers only: the teacher's top-1 as the peer script measured it
        teacher_row = {
            "top1": next(r for by_arm in runs.values() for rs in by_arm.values() for r in rs)["teacher_top1"]
        }
    targets = list(runs)
    results = {t: {arm: [r["top1"] for r in rs] for arm, rs in runs[t].items()} for t in targets}
    curves = {t: {arm: [r["curve"] for r in rs] for arm, rs in runs[t].items() if rs[0]["curve"]} for t in targets}
    stats = {t: statistics_of(runs[t]) for t in targets}
    cpu = platform.processor() or platform.machine()
    out = {
        "command": "python benchmarks/quality.py"
        + (" --quick" if args.quick else "")
        + f" --seeds {n_seeds} --model {args.model}"
        + (f" --subset {args.subset}" if args.subset else "")
        + (f" --arms {' '.join(args.arms)}" if args.arms else ""),
        "teacher": {
            "name": f"CIFAR {args.model.replace('resnet', 'ResNet-')} (pytorch-cifar-models)",
            "file": weights.name,
            "published_top1": model["published_top1"],
            **teacher_row,
        },
        "data": "lossless CIFAR-10 (../shared/data/cifar10.tar.gz, ImageFolder tree, pixel-exact WebP)",
        "seeds": sorted({r["seed"] for t in targets for rs in runs[t].values() for r in rs}),
        "seeds_per_arm": {arm: seeds_of[arm] for arm in arms},
        "missing": missing,
        "refused": refused,
        "results": results,
        "curves": curves,
        "paired": stats,
        "runs": runs,
        "settings": s,
        "configs_example": portable_config(arm_config("d_aip", model, weights, data, s, 0.5, 0)),
        "peer_example": {"script": portable(SCRIPT_PATH), **peer_args("p_tp_kd", args.model, s, 0.5, 0)},
        "wall_seconds": time.perf_counter() - started,
        "machine": {
            "description": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "libraries": key_parts["libraries"],
            "runs": run_machines(runs),
        },
        "code": code,
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    stem = "quality-quick" if args.quick else "quality"
    stem += (f"-s{args.subset}" if args.subset else "") + ("-partial" if missing else "")
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=1))
    lines = markdown(out, tag)
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(out, dest / f"{stem}.png")
    plot_curves(out, dest / f"{stem}-curves.png")
    print("\n".join(lines))


def run_machines(runs: dict) -> dict[str, int]:
    """How many of the reported runs each machine measured (runs recorded before machines were, as 'not recorded')."""
    rows = (r for by_arm in runs.values() for rs in by_arm.values() for r in rs)
    return dict(Counter(r.get("machine") or "not recorded" for r in rows).most_common())


def statistics_of(by_arm: dict[str, list[dict]]) -> dict:
    """Per arm: mean and spread; paired over the seeds both ran: each arm against a_ce and against p_tp_kd, and each
    added ingredient (STEPS)."""

    def pair(x: str, y: str) -> dict | None:
        if x not in by_arm or y not in by_arm:
            return None
        ys = {r["seed"]: r["top1"] for r in by_arm[y]}
        common = [r for r in by_arm[x] if r["seed"] in ys]
        if not common:
            return None
        return {
            "seeds": [r["seed"] for r in common],
            **paired([r["top1"] for r in common], [ys[r["seed"]] for r in common]),
        }

    per_arm = {arm: describe([r["top1"] for r in rs]) for arm, rs in by_arm.items()}
    return {
        "per_arm": per_arm,
        "vs_a": {arm: p for arm in by_arm if arm != "a_ce" and (p := pair(arm, "a_ce"))},
        "vs_peer": {arm: p for arm in by_arm if arm != "p_tp_kd" and (p := pair(arm, "p_tp_kd"))},
        "steps": {f"{x} - {y}": p for x, y in STEPS if (p := pair(x, y))},
    }


if __name__ == "__main__":
    main()
