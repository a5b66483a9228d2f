"""The stage table: params, FLOPs, top-1 and top-5 per stage with their ratios to the teacher, as JSON and Markdown."""

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


def table_lines(teacher: Row, stages: list[Row]) -> list[str]:
    """A Markdown table: the teacher, then one row per stage, with ratios to the teacher and the top-1 change."""
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


def write_report(run_dir: Path, teacher: Row, stages: list[Row]) -> str:
    """Write report.json and report.md into the run directory; return the Markdown table."""
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps({"teacher": teacher, "stages": stages}, indent=1))
    table = "\n".join(table_lines(teacher, stages))
    (run_dir / "report.md").write_text(
        "# Stage table\n\nFLOPs from torch.utils.flop_counter (one image); top-1/top-5 in % on the validation set."
        f"\n\n{table}\n"
    )
    return table
