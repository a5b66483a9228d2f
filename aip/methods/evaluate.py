"""`mode: eval`: params, FLOPs, top-1 and top-5 of `model.teacher_checkpoint` (or the given model) on the
validation set, nothing trained; the figures are the ones a pruning run would report for that teacher."""

from __future__ import annotations

import time
from pathlib import Path

from aip.report import write_report
from aip.session import Outcome, Session


def run_eval(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """Load the configured checkpoint (or take the given model), measure it, write report.json / report.md (the
    runner refuses `resume` and `branch` in this mode)."""
    started = time.perf_counter()
    acc = session.accelerator
    checkpoint = session.cfg.model.teacher_checkpoint
    if session.model is not None:
        model, what = session.new_model(), "the given model"
    else:
        model, what = session.load_weights(Path(checkpoint)), str(checkpoint)
    model = model.to(acc.device).eval().requires_grad_(False)
    metrics = session.metrics(model, acc.prepare_data_loader(session.val_loader()))
    row = {**session.cost(model), **metrics}
    if session.main:
        table = write_report(session.run_dir, row, [])
        seconds = time.perf_counter() - started
        session.print(f"\n{table}\n\n{what} on {len(session.data.val)} validation images in {seconds:.1f} s")
        session.print(f"run directory: {session.run_dir}")
    acc.wait_for_everyone()
    session.close()
    return Outcome({"teacher": row, "stages": []}, model)
