"""`mode: eval`: params, FLOPs, top-1 and top-5 of `model.teacher_checkpoint` on the validation set, nothing trained.

Uses the Engine's accelerator, weight loading, cost and evaluation, so the figures are the ones a pruning run would
report for that teacher; report.json holds the teacher row and no stages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aip.engine import Engine
from aip.report import write_report


def run_eval(engine: Engine) -> dict[str, Any]:
    """Load the configured checkpoint, measure it, write report.json / report.md; return the report."""
    started = time.perf_counter()
    acc = engine.accelerator
    path = Path(engine.cfg.model.teacher_checkpoint)
    model = engine.load_weights(path).to(acc.device).eval().requires_grad_(False)
    top1, top5 = engine.evaluate(model, acc.prepare_data_loader(engine.val_loader()))
    row = {**engine.cost(model), "top1": top1, "top5": top5}
    if engine.main:
        table = write_report(engine.run_dir, row, [])
        seconds = time.perf_counter() - started
        engine.print(f"\n{table}\n\n{path} on {len(engine.data.val)} validation images in {seconds:.1f} s")
        engine.print(f"run directory: {engine.run_dir}")
    acc.wait_for_everyone()
    if engine.writer is not None:
        engine.writer.close()
    return {"teacher": row, "stages": []}
