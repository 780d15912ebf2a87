"""The one exception type the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting or bad data, explained in one line (the CLI prints ``arsq: error: <message>``)."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
