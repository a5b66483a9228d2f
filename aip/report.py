"""The stage table: params, FLOPs and two quality metrics per stage (top-1/top-5, a detector's mAP and mAP@.5)
with their ratios to the teacher, as JSON and Markdown,
and a plot of accuracy against FLOPs stage by stage.

Latency is left to benchmarks/speed.py: timings are noisy, and a resumed run must write the same table as an
unbroken one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


LABELS = {"top1": "top-1", "top5": "top-5", "map": "mAP", "map50": "mAP@.5"}


def metric_names(teacher: Row) -> tuple[str, str]:
    """The two quality columns of a report: mAP and mAP@.5 for a detector, else top-1 and top-5."""
    return ("map", "map50") if "map" in teacher else ("top1", "top5")


def table_lines(teacher: Row, stages: list[Row]) -> list[str]:
    """A Markdown table: the teacher, then one row per stage, with ratios to the teacher and the top-1 change
    (a detector's: both mAPs with their ratios to the teacher's)."""
    if "map" in teacher:
        return _detection_lines(teacher, stages)
    head = "| stage | kind | params | FLOPs | top-1 | top-5 | params ratio | FLOPs ratio | top-1 change |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(
        f"| teacher | - | {_human(teacher['params'])} | {_human(teacher['flops'])} | {teacher['top1']:.2f} "
        f"| {teacher['top5']:.2f} | 1.000 | 1.000 | - |"
    )
    for row in stages:
        lines.append(
            f"| {row['stage']} | {row['kind']} | {_human(row['params'])} | {_human(row['flops'])} | {row['top1']:.2f} "
            f"| {row['top5']:.2f} | {row['params'] / teacher['params']:.3f} | {row['flops'] / teacher['flops']:.3f} "
            f"| {row['top1'] - teacher['top1']:+.2f} |"
        )
    return lines


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base > 0 else "-"


def _detection_lines(teacher: Row, stages: list[Row]) -> list[str]:
    head = "| stage | kind | params | FLOPs | mAP | mAP@.5 | params ratio | FLOPs ratio | mAP ratio | mAP@.5 ratio |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in [{"stage": "teacher", "kind": "-", **teacher}, *stages]:
        lines.append(
            f"| {row['stage']} | {row['kind']} | {_human(row['params'])} | {_human(row['flops'])} | {row['map']:.2f} "
            f"| {row['map50']:.2f} | {row['params'] / teacher['params']:.3f} | {row['flops'] / teacher['flops']:.3f} "
            f"| {_ratio(row['map'], teacher['map'])} | {_ratio(row['map50'], teacher['map50'])} |"
        )
    return lines


def plot_stages(teacher: Row, stages: list[Row], path: Path) -> None:
    """Top-1 and top-5 against the FLOPs ratio to the teacher, one point per stage, the teacher at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [1.0] + [row["flops"] / teacher["flops"] for row in stages]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in metric_names(teacher):
        label = LABELS[key]
        values = [teacher[key]] + [row[key] for row in stages]
        ax.plot(ratios, values, marker="o", label=label)
        for ratio, value, name in zip(ratios, values, ["T"] + [str(r["stage"]) for r in stages], strict=True):
            ax.annotate(name, (ratio, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.invert_xaxis()
    ax.set_xlabel("FLOPs ratio to the teacher")
    ax.set_ylabel(("mAP" if "map" in teacher else "accuracy") + " (%) on the validation set")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def deploy_lines(section: dict[str, Any]) -> list[str]:
    """The `## Deploy` section of report.md: top-1 and onnxruntime CPU latency of each model's fp32 and int8 ONNX."""
    batch = section["batch_size"]
    head = f"| model | format | top-1 | top-1 vs fp32 | latency batch 1 (ms) | latency batch {batch} (ms) | size (MB) |"
    lines = [
        "## Deploy",
        "",
        f"onnxruntime {section['provider']}, {section['intra_op_threads']} intra-op thread(s), median latency; "
        f"int8: {section['quantization']}, calibrated on {section['calibration_images']} training images.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    fp32 = {r["model"]: r["top1"] for r in section["rows"] if r["format"] == "onnx"}
    for r in section["rows"]:
        change = f"{r['top1'] - fp32[r['model']]:+.2f}" if r["model"] in fp32 else "-"
        lines.append(
            f"| {r['model']} | {r['format']} | {r['top1']:.2f} | {change} | {r['latency_ms_batch1']:.3f} "
            f"| {r[f'latency_ms_batch{batch}']:.3f} | {r['size_mb']:.2f} |"
        )
    return lines


def write_report(
    run_dir: Path,
    teacher: Row,
    stages: list[Row],
    curve: list[Row] | None = None,
    notes: list[str] | None = None,
    deploy: dict[str, Any] | None = None,
) -> str:
    """Write report.json, report.md and (with stages) report.png into the run directory; return the Markdown table.
    `curve` (train.eval_each_epoch): top-1 after each prune (epoch 0) and each recovery epoch, in report.json;
    `notes`: what the run decided in the user's place (a fallback), in both files; `deploy` (export.formats
    onnx_int8): the fp32/int8 ONNX table of aip.deploy, in both files."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"teacher": teacher, "stages": stages}
    if curve:
        out["curve"] = curve
    if notes:
        out["notes"] = notes
    if deploy:
        out["deploy"] = deploy
    (run_dir / "report.json").write_text(json.dumps(out, indent=1))
    table = "\n".join(table_lines(teacher, stages))
    what = (
        "FLOPs of the prunable view (backbone to raw head outputs, one image at the configured size); mAP@[.5:.95] and "
        "mAP@.5 in %"
        if "map" in teacher
        else "FLOPs from torch.utils.flop_counter (one image); top-1/top-5 in %"
    )
    extra = "".join(f"\n- {note}" for note in notes or [])
    extra = f"\n## Notes\n{extra}\n" if extra else ""
    extra += "\n" + "\n".join(deploy_lines(deploy)) + "\n" if deploy else ""
    (run_dir / "report.md").write_text(f"# Stage table\n\n{what} on the validation set.\n\n{table}\n{extra}")
    if stages:
        plot_stages(teacher, stages, run_dir / "report.png")
    return table
