"""The model registry: our own families by name, plus any `torchvision:<name>` or `timm:<name>`."""

from __future__ import annotations

from aip.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register
