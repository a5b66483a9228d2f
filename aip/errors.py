"""The error every module may raise for a bad config value; imports nothing from aip, so anything can import it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key and what is allowed."""
