"""The run's outcome: :class:`RunFailed`, and the console filter for handled failures
(:mod:`tasks._quiet`, shared with the processes that run stages)."""

from __future__ import annotations

from tasks._quiet import quiet_handled_failures


class RunFailed(RuntimeError):
    """The recipe ran what it could and some stages failed; ``summary`` holds what it made."""

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}


__all__ = ["RunFailed", "quiet_handled_failures"]
