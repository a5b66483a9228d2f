"""The quality benchmark's statistics and reporting: mean and paired differences over seeds, the Markdown tables,
the end-point plot and the recovery curves (see benchmarks/quality.py)."""

from __future__ import annotations

import hashlib
import math
import statistics
from pathlib import Path


def describe(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if n > 1 else None
    return {"n": n, "mean": mean, "std": sd, "se": sd / math.sqrt(n) if sd is not None else None}


def paired(xs: list[float], ys: list[float]) -> dict:
    """Paired difference x - y over seeds: mean, std, standard error, a two-sided paired t-test's p, and the call
    (a win or a loss only where p < 0.05)."""
    from scipy.stats import ttest_rel

    differences = [x - y for x, y in zip(xs, ys, strict=True)]
    d = describe(differences)
    p = None
    if d["std"] is None:
        call = "n/a (one seed)"
    else:
        p = float(ttest_rel(xs, ys).pvalue) if d["std"] > 0 else (0.0 if d["mean"] != 0 else 1.0)
        call = "no difference" if p >= ALPHA else ("win" if d["mean"] > 0 else "loss")
    return {**d, "p": p, "differences": differences, "call": call}


ALPHA = 0.05  # the two-sided paired t-test's level for a win or a loss


def fmt(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if sign else f"{v:.2f}"


def pfmt(p: dict | None) -> str:
    """A paired comparison as 'mean (p) call' for a table cell."""
    if not p:
        return "-"
    if p.get("p") is None:
        return fmt(p["mean"], True)
    return f"{fmt(p['mean'], True)} (p {pvalue(p['p'])}) {p['call']}"


def pvalue(p: float) -> str:
    """A p-value to three places, '< 0.001' below that."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def machines(machine: dict) -> str:
    """The machines that measured the reported runs, with how many each (older results files: the report's own)."""
    runs = machine.get("runs")
    if not runs:
        return machine["description"]
    return "; ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in runs.items())


def markdown(out: dict, tag: str) -> list[str]:
    s, teacher = out["settings"], out["teacher"]
    lines = [
        f"# Quality: CIFAR-10, published {teacher['name']} teacher, 50% and 30% FLOPs ({tag})",
        "",
        f"Command: `{out['command']}` on {out['machine']['description']}, torch {out['machine']['torch']}, "
        f"torch-pruning {out['machine']['libraries']['torch-pruning']}; {out['wall_seconds'] / 60:.0f} minutes "
        f"(cached runs count as 0). Code {out['code']['commit'][:10]}"
        f"{' + uncommitted aip/ changes' if out['code']['aip_changes_sha256'] != EMPTY_SHA else ''}.",
        f"Runs measured on: {machines(out['machine'])}.",
        "",
        f"Teacher: {teacher['file']} (top-1 {teacher['top1']:.2f} here, published {teacher['published_top1']:.2f}). "
        f"Data: {out['data']}. Training subset {s['subset']} images (fixed, the same files for every arm), batch "
        f"{s['batch_size']}, SGD lr {s['lr']} (momentum 0.9, weight decay 5e-4, cosine per phase); "
        f"{s['intervals']} pruning steps x {s['between']} epochs + {s['finetune']} fine-tune epochs "
        f"({s['recovery_epochs']} recovery epochs). Peers (`benchmarks/peers/torch_pruning_kd.py`): Torch-Pruning's "
        "MetaPruner, GroupMagnitudeImportance(p=1), global, its linear iterative schedule (ratio bisected to the "
        "FLOPs target), the last step re-bisected on the trained weights to land on it; p_tp_ce: cross-entropy, "
        "p_tp_kd: 0.7 CE + 0.3 T^2 KL at T=4. aip arms a-e: L1 "
        f"(e: hybrid); f_acp: width search (swarm {s['acp']['particles']} particles x {s['acp']['iterations']} "
        f"iterations x {s['acp']['recovery_steps']} steps on {s['acp']['holdout_size']} held-out images: "
        f"{s['acp_search_steps']} training steps besides the recovery). Top-1 on the full 10,000-image test set. "
        "Seeds per arm: " + ", ".join(f"{arm} {len(v)}" for arm, v in out["seeds_per_arm"].items()) + ".",
        "",
    ]
    if out.get("missing"):
        lines += [
            f"**Partial**: {len(out['missing'])} runs are left out (not asked for, or not finished with this code): "
            f"{', '.join(out['missing'])}.",
            "",
        ]
    for target in out["results"]:
        runs, stats = out["runs"][target], out["paired"][target]
        lines += [
            f"## {float(target):.0%} of the teacher's FLOPs",
            "",
            "| arm | top-1 mean | std | per seed | FLOPs ratio | params ratio | vs p_tp_kd | vs a_ce | vs teacher "
            "| wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, rs in runs.items():
            top1 = [r["top1"] for r in rs]
            d = describe(top1)
            wall = statistics.mean(r["seconds"] for r in rs)
            search = [r["search_seconds"] for r in rs if r.get("search_seconds") is not None]
            wall_s = f"{wall:.0f}" + (f" (search {statistics.mean(search):.0f})" if search else "")
            lines.append(
                f"| {arm} | {d['mean']:.2f} | {fmt(d['std'])} | {', '.join(f'{v:.2f}' for v in top1)} "
                f"| {statistics.mean(r['flops_ratio'] for r in rs):.3f} "
                f"| {statistics.mean(r['params_ratio'] for r in rs):.3f} "
                f"| {pfmt(stats['vs_peer'].get(arm))} | {pfmt(stats['vs_a'].get(arm))} "
                f"| {d['mean'] - teacher['top1']:+.2f} | {wall_s} |"
            )
        for arm, rs in out.get("refused", {}).get(target, {}).items():
            seeds = ", ".join(str(r["seed"]) for r in rs)
            lines.append(f"| {arm} | refused (seeds {seeds}): {rs[0]['reason']} | | | | | | | | |")
        if stats["steps"]:
            lines += ["", "Each added ingredient (paired over seeds):", ""]
            lines += ["| comparison | seeds | mean | std | SE | p | call |", "|---|---|---|---|---|---|---|"]
            for name, p in stats["steps"].items():
                p_value = "-" if p["p"] is None else pvalue(p["p"])
                lines.append(
                    f"| {name} | {len(p['seeds'])} | {fmt(p['mean'], True)} | {fmt(p['std'])} | {fmt(p['se'])} "
                    f"| {p_value} | {p['call']} |"
                )
        lines.append("")
    lines += [
        "Paired differences are taken over the seeds both arms ran (same seed: same data order where the code is "
        "the same); a win or a loss only where a two-sided paired t-test gives p < 0.05. f_acp's wall time includes "
        "its width search (in brackets).",
    ]
    lines += curve_table(out)
    return lines


def curve_points(report: dict) -> list[list[float]]:
    """[epochs spent, top-1, 1 after a prune else 0] after each prune and each recovery epoch, in run order."""
    points, spent = [], 0
    for stage in report["stages"]:
        for p in (p for p in report.get("curve", []) if p["stage"] == stage["stage"]):
            points.append([spent + p["epoch"], p["top1"], int(p["epoch"] == 0)])
        spent += max((p["epoch"] for p in report.get("curve", []) if p["stage"] == stage["stage"]), default=0)
    return points


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """The mean over seeds, point by point (every seed has the same points)."""
    return [[pts[0][0], statistics.mean(p[1] for p in pts), pts[0][2]] for pts in zip(*curves, strict=True)]


def curve_table(out: dict) -> list[str]:
    lines = [
        "",
        "## Recovery curves",
        "",
        "Mean top-1 over seeds after each prune (p, at the epochs spent so far) and after each recovery epoch (e) "
        "of aip's arms; f_acp's first prune follows its search. Plot: quality-curves.png.",
    ]
    for target in out["results"]:
        lines += ["", f"### {float(target):.0%} of the teacher's FLOPs", ""]
        for arm, per_seed in out["curves"][target].items():
            points = mean_curve(per_seed)
            labels = [f"{'p' if pruned else 'e'}{x:g}: {v:.2f}" for x, v, pruned in points]
            lines.append(f"- {arm}: " + ", ".join(labels))
    return lines


def plot_curves(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out["results"]), figsize=(5.5 * len(out["results"]), 4.2), squeeze=False)
    for ax, target in zip(axes[0], out["results"], strict=True):
        for i, (arm, per_seed) in enumerate(out["curves"][target].items()):
            points = mean_curve(per_seed)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, color=f"C{i}", label=arm)
        ax.axhline(out["teacher"]["top1"], color="0.4", ls="--", lw=1, label="teacher")
        ax.set_title(f"{float(target):.0%} of the teacher's FLOPs")
        ax.set_xlabel("recovery epochs spent (a vertical drop: a prune)")
        ax.set_ylabel("top-1 (%) on the CIFAR-10 test set")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{out['teacher']['name']}: recovery curves, mean over seeds {out['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out["results"]), figsize=(5.5 * len(out["results"]), 4.2), squeeze=False)
    for ax, target in zip(axes[0], out["results"], strict=True):
        for i, arm in enumerate(out["results"][target]):
            values = out["results"][target][arm]
            ax.scatter([i] * len(values), values, color="0.6", s=12, zorder=2)
            d = describe(values)
            ax.errorbar([i], [d["mean"]], yerr=[d["std"] or 0.0], fmt="o", color=f"C{i}", capsize=4, zorder=3)
        ax.set_xticks(
            range(len(out["results"][target])), list(out["results"][target]), rotation=30, ha="right", fontsize=8
        )
        ax.set_title(f"{float(target):.0%} of the teacher's FLOPs (teacher {out['teacher']['top1']:.2f})")
        ax.set_ylabel("top-1 (%) on the CIFAR-10 test set")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{out['teacher']['name']}: mean ± std over seeds {out['seeds']} (grey: each seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
