"""Quality benchmark on real CIFAR-10: does each loss term earn its place, starting from a published teacher?

    python benchmarks/quality.py [--quick] [--seeds N] [--model resnet20|resnet56] [--data DIR] [--out DIR]
                                 [--targets 0.5 0.3] [--no-run]

No teacher is trained: the teacher is a fully trained CIFAR ResNet from ../shared/weights (pytorch-cifar-models,
ResNet-20 92.60% / ResNet-56 94.37% top-1), loaded with `model.checkpoint_rename: {".downsample.": ".shortcut."}`
and the normalisation it was trained with (`data.mean`/`data.std`, as configs/cifar10_resnet20_eval.yaml).
From it, for each target (50% and 30% of the teacher's FLOPs) and each seed, with the same criterion (L1), the same
target, the same total recovery epochs, the same data order and the same seeds, six arms:
  a_ce          prune + fine-tune with cross-entropy only (the usual Torch-Pruning workflow),
  b_kd          + distillation on the logits (KL),
  c_kd_at       + attention transfer,
  d_aip         + adversarial term (full AIP),
  e_aip_hybrid  full AIP with the hybrid criterion (L1, then similarity),
  f_acp         `mode: acp`: searched per-layer widths, then one AIP recovery of as many epochs as the others' total
                (the search itself is extra: its seconds and training steps are reported beside the wall times).
Top-1 is always on the full 10,000-image test set; training uses a fixed subset (`data.train_subset`).

Statistics: mean and standard deviation over seeds per arm, and for each arm the paired difference to arm a of the
same seed (mean, standard deviation, standard error); a difference is called a win only when the paired mean exceeds
twice its standard error (a loss when it is below minus twice; with one seed no call is made). The same paired
statistics between consecutive arms (b-a, c-b, d-c, e-d, f-d) say what each added term brings.

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
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TARGETS = ("0.5", "0.3")
# The libraries whose version changes the numbers (kernels, pruning, transforms): part of every cache key.
LIBRARIES = ("torch", "torchvision", "torch-pruning")
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
}
# Consecutive comparisons: what each added ingredient brings over the arm without it.
STEPS = [("b_kd", "a_ce"), ("c_kd_at", "b_kd"), ("d_aip", "c_kd_at"), ("e_aip_hybrid", "d_aip"), ("f_acp", "d_aip")]
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


def fail(message: str) -> None:
    sys.exit(f"error: {' '.join(message.split())}")


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout


def code_version() -> dict:
    """HEAD and its aip/ tree, plus a hash of the uncommitted changes under aip/ (tracked diff and untracked files)."""
    try:
        head = git("rev-parse", "HEAD").decode().strip()
        tree = git("rev-parse", "HEAD:aip").decode().strip()
        diff = git("diff", "HEAD", "--", "aip")
        digest = hashlib.sha256(diff)
        untracked = git("ls-files", "--others", "--exclude-standard", "--", "aip").decode().split()
    except (OSError, subprocess.CalledProcessError) as exc:
        fail(f"cannot read the code version with git in {REPO} ({exc}); run from a git checkout")
    for name in sorted(untracked):
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return {
        "commit": head,
        "aip_tree": tree,
        "aip_changes_sha256": digest.hexdigest(),
        "dirty": bool(diff or untracked),
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_versions() -> dict[str, str]:
    """The installed version of each of LIBRARIES, as their package metadata says (nothing is imported)."""
    try:
        return {name: importlib.metadata.version(name) for name in LIBRARIES}
    except importlib.metadata.PackageNotFoundError as exc:
        fail(f"{exc.name} is not installed; pip install -e . first")


def cache_key_parts(code: dict, weights: Path) -> dict:
    """What, besides an arm's config, names its cached run: the aip/ code (not HEAD: other commits keep the cache),
    the teacher file and the library versions. Shared with benchmarks/ablations.py, whose baseline runs are the
    quality runs."""
    return {
        "code": {k: code[k] for k in ("aip_tree", "aip_changes_sha256")},
        "teacher_sha256": file_sha256(weights),
        "libraries": library_versions(),
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
    if cfg["mode"] == "acp":  # one recovery stage of the others' total epochs; no intervals
        a = s["acp"]
        cfg["prune"]["finetune_epochs"] = recovery_epochs(s)
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


def expected_stages(cfg: dict) -> int:
    if cfg["mode"] == "acp":
        return 1
    return cfg["prune"]["intervals"] + (1 if cfg["prune"]["finetune_epochs"] > 0 else 0)


def complete(run_dir: Path, key: str, cfg: dict) -> dict | None:
    """The run's report and our record of it when both exist, match the key and hold every stage; else None."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
        meta = json.loads(run_dir.with_name(run_dir.name + ".done.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or len(report.get("stages", [])) != expected_stages(cfg) or not report.get("teacher"):
        return None
    return {"report": report, **meta}


def run_arm(cfg: dict, key_parts: dict, work: Path, label: str, dry: bool = False) -> dict | None:
    """Run one arm in work/<label>-<key> (reused when complete with the same key); its report and wall time.
    `dry`: only a complete cached run, else None."""
    import yaml

    from aip.train import main as train_main

    key = hashlib.sha256(json.dumps({**key_parts, "config": cfg}, sort_keys=True).encode()).hexdigest()
    run_dir = work / f"{label}-{key[:16]}"
    done = complete(run_dir, key, cfg)
    if done is not None:
        print(f"{label}: cached in {run_dir}", flush=True)
        return {**done, "cached": True, "run_dir": str(run_dir)}
    if dry:
        return None
    # The run directory holds only the run (aip refuses foreign files there); our records lie beside it.
    cfg_path = run_dir.with_name(run_dir.name + ".yaml")
    done_path = run_dir.with_name(run_dir.name + ".done.json")
    started_path = run_dir.with_name(run_dir.name + ".started")
    work.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done_path.unlink(missing_ok=True)
    resumed = started_path.is_file() and run_dir.is_dir()  # an earlier try of this key was cut short
    started_path.write_text(key + "\n")
    print(f"{label}: {'resuming' if resumed else 'running'} in {run_dir}", flush=True)
    start = time.perf_counter()
    # Same key: an interrupted run goes on from its newest checkpoint (or from the start in its own directory).
    code = train_main(["--config", str(cfg_path), "--out", str(run_dir), "--resume", "auto"])
    if code != 0:
        fail(f"the run {label} failed (exit {code}) in {run_dir}; see its output above")
    seconds = time.perf_counter() - start
    search = None
    if cfg["mode"] == "acp":
        log = json.loads((run_dir / "pruning_log.json").read_text())
        search = next((e.get("seconds") for e in log if e.get("criterion") == "acp"), None)
    meta = {"key": key, "seconds": seconds, "resumed": resumed, "search_seconds": search}
    done_path.write_text(json.dumps(meta, indent=1))
    done = complete(run_dir, key, cfg)
    if done is None:
        fail(f"the run {label} ended without a complete report.json in {run_dir}")
    return {**done, "cached": False, "run_dir": str(run_dir)}


from quality_report import curve_points, describe, markdown, paired, plot, plot_curves  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, small subset, both targets (about 10 minutes)")
    parser.add_argument("--seeds", type=int, help="seeds per arm, 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet20", help="the published teacher")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder tree with train/ and test/ (default ~/.cache/aip/cifar10)")
    parser.add_argument("--weights", default=str(SHARED / "weights"), help="folder of the published teachers")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work", default=str(REPO / "benchmarks" / ".cache" / "quality"), help="run directories")
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="run nothing: report the complete cached runs of this code (seeds that every arm finished) as *-partial",
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
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    if not seeds:
        fail("--seeds must be at least 1")
    code = code_version()  # before the engine is imported: the code these runs use
    model = MODELS[args.model]
    weights = Path(args.weights) / model["weights"]
    if not weights.is_file():
        fail(f"no published teacher at {weights}; pass --weights DIR (the folder of ../shared/weights)")
    data = find_data(args.data)
    s = {**SETTINGS[args.quick], "recovery_epochs": recovery_epochs(SETTINGS[args.quick])}
    a = s["acp"]
    s["recovery_steps"] = s["recovery_epochs"] * math.ceil(s["subset"] / s["batch_size"])
    s["acp_search_steps"] = a["particles"] * a["iterations"] * a["recovery_steps"]  # besides the recovery
    tag = "quick" if args.quick else "full"
    work = Path(args.work)
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import torch

    key_parts = cache_key_parts(code, weights)
    started = time.perf_counter()
    runs: dict = {t: {arm: [] for arm in ARMS} for t in TARGETS}
    teacher_row, missing = None, []
    for target in TARGETS:
        if target not in args.targets:
            missing += [f"{args.model}-{arm}-t{target}-s{seed}" for seed in seeds for arm in ARMS]
            continue
        for seed in seeds:  # seed-major: a cut-short sitting still has paired arms for the seeds it reached
            for arm in ARMS:
                cfg = arm_config(arm, model, weights, data, s, float(target), seed)
                label = f"{args.model}-{arm}-t{target}-s{seed}"
                done = run_arm(cfg, key_parts, work, label, dry=args.no_run)
                if done is None:
                    missing.append(label)
                    continue
                report = done["report"]
                t, final = report["teacher"], report["stages"][-1]
                teacher_row = teacher_row or t
                runs[target][arm].append(
                    {
                        "seed": seed,
                        "top1": final["top1"],
                        "top5": final["top5"],
                        "flops_ratio": final["flops"] / t["flops"],
                        "params_ratio": final["params"] / t["params"],
                        "seconds": done["seconds"],
                        "search_seconds": done.get("search_seconds"),
                        "cached": done["cached"],
                        "resumed": done.get("resumed", False),
                        "run_dir": done["run_dir"],
                        "key": done["key"],
                        "stages": [
                            {
                                "stage": st["stage"],
                                "kind": st["kind"],
                                "flops_ratio": st["flops"] / t["flops"],
                                "top1": st["top1"],
                            }
                            for st in report["stages"]
                        ],
                        "curve": curve_points(report),
                    }
                )
                print(f"{label}: top-1 {final['top1']:.2f} ({done['seconds']:.0f} s)", flush=True)
    if missing:  # --no-run: keep the seeds every arm of a target finished, and the targets that have one
        for t in TARGETS:
            full = [x for x in seeds if all(any(r["seed"] == x for r in rs) for rs in runs[t].values())]
            runs[t] = {arm: [r for r in rs if r["seed"] in full] for arm, rs in runs[t].items()}
        runs = {t: rs for t, rs in runs.items() if rs["a_ce"]}
        if not runs:
            fail(f"no target has a seed that every arm finished with this code; missing: {', '.join(missing)}")
    targets = list(runs)
    results = {t: {arm: [r["top1"] for r in rs] for arm, rs in runs[t].items()} for t in targets}
    curves = {t: {arm: [r["curve"] for r in rs] for arm, rs in runs[t].items()} for t in targets}
    stats = {
        t: {
            "per_arm": {arm: describe(v) for arm, v in results[t].items()},
            "vs_a": {arm: paired(v, results[t]["a_ce"]) for arm, v in results[t].items() if arm != "a_ce"},
            "steps": {f"{x} - {y}": paired(results[t][x], results[t][y]) for x, y in STEPS},
        }
        for t in targets
    }
    cpu = platform.processor() or platform.machine()
    out = {
        "command": "python benchmarks/quality.py"
        + (" --quick" if args.quick else "")
        + f" --seeds {len(seeds)} --model {args.model}",
        "teacher": {
            "name": f"CIFAR {args.model.replace('resnet', 'ResNet-')} (pytorch-cifar-models)",
            "file": weights.name,
            "published_top1": model["published_top1"],
            **teacher_row,
        },
        "seeds": sorted({r["seed"] for t in targets for r in runs[t]["a_ce"]}),
        "seeds_per_target": {t: [r["seed"] for r in runs[t]["a_ce"]] for t in targets},
        "missing": missing,
        "results": results,
        "curves": curves,
        "paired": stats,
        "runs": runs,
        "settings": s,
        "configs_example": arm_config("d_aip", model, weights, data, s, 0.5, 0),
        "wall_seconds": time.perf_counter() - started,
        "machine": {
            "description": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "libraries": key_parts["libraries"],
        },
        "code": code,
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    stem = ("quality-quick" if args.quick else "quality") + ("-partial" if missing else "")
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=1))
    lines = markdown(out, tag)
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(out, dest / f"{stem}.png")
    plot_curves(out, dest / f"{stem}-curves.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
