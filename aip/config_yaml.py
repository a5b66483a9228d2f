"""YAML for the config: recipe files and `--set` values, read with duplicate keys refused, and how overrides merge.

PyYAML keeps the last of a key given twice without a word; `UniqueKeyLoader` refuses it, naming the key and its
line. Overrides merge into the recipe by the schema: a section (`train`, `prune.hybrid`, ...) merges key by key, a
mapping named by dotted keys (`--set data.options.val_size=50`) merges into the mapping it names, and any other value
replaces, a whole mapping given in one `--set` (`--set 'data.options={val_size: 50}'`) included.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from aip.errors import ConfigError
from aip.schema import Config


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice; the message names the key and both lines."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (a `<<` merge may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of `node`, after checking that none of its own keys repeats."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class refuses it with its own message
                continue
            if first is not None:
                raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first at line {first}); give it once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class Whole(dict):
    """A mapping given whole as one `--set` value: it replaces the key's value instead of merging into it."""


def _whole(value: Any) -> Any:
    """`value` with every mapping in it marked `Whole`."""
    return Whole({k: _whole(v) for k, v in value.items()}) if isinstance(value, dict) else value


def read_recipe(path: Path) -> dict[str, Any]:
    """The sections of a recipe file (empty for an empty file); every problem is one ConfigError line."""
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file; the recipes are in configs/")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"--config {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {str(path)!r}: not valid YAML ({' '.join(str(exc).split())})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--config {str(path)!r}: the top level must be a mapping of sections")
    return loaded or {}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=0.05", "prune.intervals=4"]` into a nested dict; values are parsed as YAML scalars, and a
    mapping value is marked `Whole` (it replaces the key's mapping; dotted keys set one key of it)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, for example train.lr=0.05")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=UniqueKeyLoader) if raw != "" else None
        except DuplicateKeyError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = _whole(value)
    return out


def _takes_mapping(tp: Any) -> bool:
    """Whether a config key of type `tp` holds a mapping: a section, or a free-form `dict[...]`."""
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict


def merge(base: dict[str, Any], extra: dict[str, Any], cls: type | None = Config, prefix: str = "") -> dict[str, Any]:
    """`extra` (parsed overrides) over `base` (the recipe), following the keys of `cls` (None: a free-form mapping).

    A section or mapping key that the recipe gives as something else (`train: 5`) is refused."""
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = dict(base)
    for key, value in extra.items():
        tp, old = hints.get(key), out.get(key)
        if key in out and not isinstance(old, dict) and _takes_mapping(tp):
            raise ConfigError(f"{prefix}{key}: expected a mapping of keys, got {old!r}")
        section = dataclasses.is_dataclass(tp)
        if isinstance(value, dict) and isinstance(old, dict) and (section or not isinstance(value, Whole)):
            out[key] = merge(old, value, tp if section else None, f"{prefix}{key}.")
        else:
            out[key] = value
    return out
