"""The methods a run can be: `train`, `eval`, `aip`, `acp`, each in a module of its own over `aip.session`."""

from __future__ import annotations

from pathlib import Path

from aip.config import ConfigError
from aip.methods.acp import run_acp
from aip.methods.aip import run_aip
from aip.methods.evaluate import run_eval
from aip.methods.train import run_train
from aip.session import Outcome, Session


def run_method(session: Session, resume: Path | None = None, branch: Path | None = None) -> Outcome:
    """Run the session's `cfg.mode` to its end: the report and the model it made."""
    mode = session.cfg.mode
    if mode == "eval":
        return run_eval(session)
    if mode == "train":
        return run_train(session)
    if mode == "acp":
        if branch is not None:
            raise ConfigError("--from-stage branches an AIP run; mode acp searches its structure from the teacher")
        return run_acp(session, resume=resume)
    return run_aip(session, resume=resume, branch=branch)
