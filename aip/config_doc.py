"""The resolved config as YAML with every key's meaning beside it: what `python aip/train.py --print-config` prints.

The meanings are the `help` of the dataclass fields in `aip/schema.py`, so the listing cannot drift from the keys
that exist; the output loads back with `load_config` to the same config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from aip.config import Config

INDENT = "  "


def field_help(node: Any, name: str) -> str:
    """The one-line meaning of field `name` of the config dataclass `node` (empty when it has none)."""
    for f in dataclasses.fields(node):
        if f.name == name:
            return " ".join(str(f.metadata.get("help", "")).split())
    raise KeyError(name)


def _value(key: str, value: Any) -> str:
    """`key: value` as one YAML line; a list or mapping in flow style (`[128, 256, 128]`, `{}`)."""
    if isinstance(value, (list, dict)):
        flow = yaml.safe_dump(value, sort_keys=False, default_flow_style=True, width=10**9).rstrip("\n")
        return f"{key}: {flow}"
    return yaml.safe_dump({key: value}, sort_keys=False, width=10**9).rstrip("\n")


def _lines(node: Any, depth: int) -> list[str]:
    pad = INDENT * depth
    out: list[str] = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        out.append(f"{pad}# {field_help(node, f.name)}")
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            out.extend(_lines(value, depth + 1))
            if depth == 0:
                out.append("")
        else:
            out.append(pad + _value(f.name, value))
    return out


def render_config(cfg: Config) -> str:
    """`cfg` as YAML, each key preceded by a `# meaning` line, sections separated by a blank line."""
    head = "# The resolved config (python aip/train.py --print-config); every key, its value and its meaning."
    return "\n".join([head, *_lines(cfg, 0)]).rstrip("\n") + "\n"
