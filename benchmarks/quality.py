"""Quality benchmark on real CIFAR-10: accuracy at equal FLOPs, AIP against the usual prune-then-fine-tune.

    python benchmarks/quality.py [--quick] [--seeds N] [--data DIR] [--out benchmarks/results]

One teacher (CIFAR ResNet-20, our own `mode: train`, cached in the work directory so the arms can be re-run) on a
fixed training subset; then, from that teacher, with the same criterion (L1), the same target (50% of the teacher's
FLOPs) and the same epoch budget, the arms:
  a. prune + fine-tune with cross-entropy only (the usual Torch-Pruning workflow),
  b. + output-feature distillation (KL on logits),
  c. + attention transfer,
  d. + adversarial loss (full AIP),
  e. full AIP with the hybrid criterion (L1, then similarity).
Each arm reports top-1 on the full test set, FLOPs and parameter ratios and wall time; with --seeds N, mean and
spread. Data: the CIFAR-10 JPEG tree (train/, test/); by default ~/.cache/aip/cifar10-jpeg, extracted from
../shared/data/cifar10-jpeg.tar when that exists. Results: <out>/quality.json, quality.md, quality.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aip.train import main as train_main  # noqa: E402

ARMS = {
    "a_ce_only": {
        "loss": {"ce": {"weight": 1.0}, "kd": {"weight": 0.0}, "at": {"weight": 0.0}, "adv": {"weight": 0.0}}
    },
    "b_kd": {"loss": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 0.0}, "adv": {"weight": 0.0}}},
    "c_kd_at": {
        "loss": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 1000.0}, "adv": {"weight": 0.0}}
    },
    "d_aip": {"loss": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 1000.0}, "adv": {"weight": 1.0}}},
    "e_aip_hybrid": {
        "loss": {"ce": {"weight": 0.7}, "kd": {"weight": 0.3}, "at": {"weight": 1000.0}, "adv": {"weight": 1.0}},
        "prune": {"criterion": "hybrid"},
    },
}
SETTINGS = {
    False: {"subset": 15000, "teacher_epochs": 25, "intervals": 3, "between": 2, "finetune": 4},
    True: {"subset": 5000, "teacher_epochs": 15, "intervals": 3, "between": 1, "finetune": 2},
}


def find_data(path: str | None) -> Path:
    """The CIFAR-10 JPEG tree; extracted once from ../shared/data when it is not there yet."""
    root = Path(path).expanduser() if path else Path.home() / ".cache" / "aip" / "cifar10-jpeg"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    tar = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar"
    if path is None and tar.is_file():
        print(f"extracting {tar} to {root} (once)", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as archive:
            archive.extractall(root, filter="data")
        return root
    sys.exit(
        f"error: no CIFAR-10 tree (train/, test/) at {root}; extract ../shared/data/cifar10-jpeg.tar there "
        "or pass --data DIR"
    )


def base_config(data: Path, s: dict, seed: int) -> dict:
    return {
        "seed": seed,
        "model": {"name": "cifar_resnet20"},
        "data": {
            "name": "cifar10",
            "root": str(data),
            "batch_size": 128,
            "eval_batch_size": 500,
            "train_subset": s["subset"],
        },
        "train": {
            "epochs": s["teacher_epochs"],
            "teacher_epochs": s["teacher_epochs"],
            "lr": 0.05,
            "log_every": 50,
            "eval_every": 5,
        },
        "prune": {
            "criterion": "l1",
            "target_flops_ratio": 0.5,
            "intervals": s["intervals"],
            "epochs_between": s["between"],
            "finetune_epochs": s["finetune"],
        },
    }


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(config: dict, work: Path, name: str) -> tuple[dict, float]:
    """Run aip/train.py on `config` in work/name (skipped when its report exists); (report, wall seconds)."""
    run_dir = work / name
    report = run_dir / "report.json"
    if report.is_file():
        meta = json.loads((run_dir / "wall.json").read_text())
        return json.loads(report.read_text()), meta["seconds"]
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    # An interrupted run of the same arm goes on from its checkpoint; a fresh one starts in the empty directory.
    code = train_main(["--config", str(cfg_path), "--out", str(run_dir), "--resume", "auto"])
    if code != 0:
        sys.exit(f"error: the run {name} failed (exit {code}); see its output above")
    seconds = time.perf_counter() - start
    (run_dir / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return json.loads(report.read_text()), seconds


def summarise(results: dict) -> list[str]:
    teacher = results["teacher"]
    lines = [
        "| arm | top-1 | spread | FLOPs ratio | params ratio | top-1 vs arm a | top-1 vs teacher | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher | {teacher['top1']:.2f} | - | 1.000 | 1.000 | - | - | {results['teacher_seconds']:.0f} |",
    ]
    base = statistics.mean(r["top1"] for r in results["arms"]["a_ce_only"])
    for arm, runs in results["arms"].items():
        top1 = [r["top1"] for r in runs]
        mean = statistics.mean(top1)
        spread = f"{statistics.stdev(top1):.2f}" if len(top1) > 1 else "-"
        lines.append(
            f"| {arm} | {mean:.2f} | {spread} | {statistics.mean(r['flops_ratio'] for r in runs):.3f} "
            f"| {statistics.mean(r['params_ratio'] for r in runs):.3f} | {mean - base:+.2f} "
            f"| {mean - teacher['top1']:+.2f} | {statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([1.0], [results["teacher"]["top1"]], color="k", zorder=3, label="teacher")
    for arm, runs in results["arms"].items():
        stages = runs[0]["stages"]
        ax.plot([s["flops_ratio"] for s in stages], [s["top1"] for s in stages], marker="o", label=arm)
    ax.invert_xaxis()
    ax.set_xlabel("FLOPs ratio to the teacher (stage by stage)")
    ax.set_ylabel("top-1 (%) on the CIFAR-10 test set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version for development (about 7 minutes)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm (mean and spread reported)")
    parser.add_argument("--data", help="CIFAR-10 tree with train/ and test/ (default ~/.cache/aip/cifar10-jpeg)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work", default=str(REPO / "benchmarks" / ".cache"), help="run directories (cached)")
    args = parser.parse_args()
    data = find_data(args.data)
    s = SETTINGS[args.quick]
    tag = "quick" if args.quick else "full"
    work = Path(args.work) / f"quality-{tag}"
    teacher_cfg = merge(base_config(data, s, 0), {"mode": "train"})
    teacher, teacher_seconds = run(teacher_cfg, work, "teacher")
    teacher_path = work / "teacher" / "model.pt"
    results = {
        "command": "python benchmarks/quality.py" + (" --quick" if args.quick else "") + f" --seeds {args.seeds}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "settings": s,
        "teacher": teacher["teacher"],
        "teacher_seconds": teacher_seconds,
        "arms": {},
    }
    for arm, extra in ARMS.items():
        for seed in range(args.seeds):
            cfg = merge(merge(base_config(data, s, seed), extra), {"model": {"teacher_checkpoint": str(teacher_path)}})
            report, seconds = run(cfg, work, f"{arm}-seed{seed}")
            final = report["stages"][-1]
            t = report["teacher"]
            stages = [{"flops_ratio": 1.0, "top1": t["top1"]}] + [
                {"flops_ratio": st["flops"] / t["flops"], "top1": st["top1"]} for st in report["stages"]
            ]
            results["arms"].setdefault(arm, []).append(
                {
                    "seed": seed,
                    "top1": final["top1"],
                    "flops_ratio": final["flops"] / t["flops"],
                    "params_ratio": final["params"] / t["params"],
                    "seconds": seconds,
                    "stages": stages,
                }
            )
            print(f"{arm} seed {seed}: top-1 {final['top1']:.2f} in {seconds:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality-{tag}.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Quality: CIFAR-10, ResNet-20, 50% FLOPs ({tag})",
        "",
        f"Command: `{results['command']}` on {results['machine']}. Training subset {s['subset']} images, teacher "
        f"{s['teacher_epochs']} epochs; each arm {s['intervals']} intervals x {s['between']} epochs + "
        f"{s['finetune']} fine-tune epochs; top-1 on the full 10,000-image test set.",
        "",
        *summarise(results),
    ]
    (out / f"quality-{tag}.md").write_text("\n".join(lines) + "\n")
    plot(results, out / f"quality-{tag}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
