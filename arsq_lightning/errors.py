"""The exceptions the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting or bad data, explained in one line (the CLI prints ``arsq: error: <message>``)."""


class TrainingDiverged(RuntimeError):
    """A loss term or gradient became NaN or infinite; the message names the update and the term (the CLI prints
    ``arsq: error: <message>`` and exits with status 1)."""


class Preempted(RuntimeError):
    """SIGTERM / SIGINT stopped ``fit`` after an update; ``checkpoint`` (or ``None``) resumes it."""

    def __init__(self, signum: int, update: int, checkpoint: str | None):
        super().__init__(f"stopped by signal {signum} after update {update}")
        self.signum, self.update, self.checkpoint = signum, update, checkpoint


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
