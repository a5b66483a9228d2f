"""The methods a run can be: `train`, `eval`, `aip`, `acp`, each in a module of its own over `aip.session`, found
through the `MODES` registry (`aip.methods.modes`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aip.methods.modes import MODES

if TYPE_CHECKING:
    from aip.session import Outcome, Session


def run_method(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """Run the session's `cfg.mode` to its end: the report and the model it made."""
    return MODES.get(session.cfg.mode)()(session, resume=resume, branch=branch)
