"""Name -> factory registries filled by decorators, as in timm (`@register_model("cifar_resnet56")`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UnknownNameError(ValueError):
    """A config named an entry that no registry holds; the message lists the known names."""


class Registry:
    """A plain dict of named factories with a decorator to fill it and a lookup that explains misses."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that files the decorated factory under `name`."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        """The factory filed under `name`, or an UnknownNameError listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
