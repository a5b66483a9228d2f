"""The run's taps and discriminator: which modules' features attention transfer (and a discriminator on attention
maps) reads, checked before any training, and a discriminator built from a seed of its own."""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING

from torch import nn

from aip.distill.discriminator import Discriminator
from aip.errors import ConfigError
from aip.seeding import derive_seed, seeded

if TYPE_CHECKING:
    from aip.session import Session


def uses_taps(session: Session) -> bool:
    """Whether anything reads tapped features: attention transfer, a detector's adversarial term, or a classifier's
    discriminator on attention maps."""
    cfg = session.cfg
    on_attention = session.task.disc_on_taps_only or cfg.disc.input == "attention"
    return cfg.loss.at.weight > 0 or (on_attention and cfg.loss.adv.weight > 0)


def model_label(session: Session) -> str:
    """The model as the user named it: the config's model.name, or the class of the model object given."""
    return session.cfg.model.name if session.model is None else f"{type(session.model).__qualname__} (the model given)"


def check_taps(session: Session) -> None:
    """Before any training, whenever anything uses tapped features: `model.taps` must name modules of the model
    (with close names), and without it the model's stages must be found when attention transfer needs them (a
    discriminator on attention maps alone falls back to the logits, see `tap_names`)."""
    cfg = session.cfg
    if not uses_taps(session):
        return
    model = session.probe_model()
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in cfg.model.taps or [] if t not in names]
    if missing:
        close = sorted({c for t in missing for c in difflib.get_close_matches(t, names, n=4, cutoff=0.6)})
        hint = f"close names: {', '.join(close)}" if close else f"its modules include: {', '.join(names[:12])}"
        raise ConfigError(f"model.taps: {model_label(session)} has no module {', '.join(map(repr, missing))}; {hint}")
    if not cfg.model.taps and cfg.loss.at.weight > 0:
        _default_taps(session, model)


def _default_taps(session: Session, model: nn.Module) -> list[str]:
    """The task's taps for `model` (its stages); a one-line ConfigError, naming the model, when none are found."""
    cfg = session.cfg
    named = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model_label(session)))
    try:
        return session.task.default_taps(model, named)
    except ValueError as exc:
        raise ConfigError(f"model.taps: {exc}; or set loss.at.weight: 0") from None


DISC_ON_LOGITS = (
    "disc.input attention: no stages found in {model} and model.taps is not set: the discriminator judges the "
    "logits instead (set model.taps to module names to judge attention maps)"
)


def tap_names(session: Session, student: nn.Module) -> list[str]:
    """Modules tapped for attention transfer (and the adversarial term on attention maps); none when unused (so any
    model works without them). A classifier whose stages cannot be found, with attention transfer off and no
    `model.taps`, gets none: its discriminator then judges the logits (`discriminator`), with a warning and a note
    in the report."""
    cfg = session.cfg
    if not uses_taps(session):
        return []
    if cfg.model.taps:
        return cfg.model.taps
    if cfg.loss.at.weight > 0 or session.task.disc_on_taps_only:
        return _default_taps(session, student)
    try:
        return _default_taps(session, student)
    except ConfigError:
        note = DISC_ON_LOGITS.format(model=model_label(session))
        session.print(f"warning: {note}")
        if note not in session.state.notes:
            session.state.notes.append(note)
        return []


def discriminator(session: Session, taps: list[str]) -> nn.Module:
    """A fresh discriminator initialised from a seed of its own, not from the global stream (whose state depends
    on whether the teacher was just trained or loaded), so that a restarted run builds the same one. On attention
    maps with no taps to read them from (`tap_names`' fallback), it judges the logits."""
    cfg = session.cfg
    kind = cfg.disc.input
    if kind == "attention" and not taps and uses_taps(session) and not session.task.disc_on_taps_only:
        kind = "logits"
    with seeded(derive_seed(cfg.seed, "discriminator")):
        width = session.task.disc_features(session.data.num_classes, taps, kind)
        disc = Discriminator(width, cfg.disc.hidden, kind)
    return disc.to(session.accelerator.device)
