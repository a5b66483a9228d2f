"""The criterion registry: each criterion module files its factory here with `@register_importance("name")`."""

from __future__ import annotations

from aip.registry import Registry

IMPORTANCES = Registry("criterion")
register_importance = IMPORTANCES.register
