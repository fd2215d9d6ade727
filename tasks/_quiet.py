"""Keeps Prefect's console quiet about failures the recipe reports itself, in one line.

A stage that meets bad input (a truncated checkpoint, an unknown task) ends in a handled
``Failed`` state whose message is that line (``tasks._stage``); the flow's recorder prints
it. Prefect would also log it at ERROR, twice, with an empty traceback, in whichever
process ran the task (the flow process, or a Dask worker); a run that failed because of
such stages raises ``RunFailed``, which Prefect would log with a traceback of the flow
body. This filter drops exactly those records from Prefect's *console* handlers. The API
handler is untouched, so the Prefect UI still shows every record, and an unexpected
exception keeps its traceback everywhere. The stage wrapper installs it in every process
that runs a stage; the flow installs it in its own.
"""

from __future__ import annotations

import logging
import re

from model_glue.errors import InputError


def _error_names(cls: type = InputError) -> set[str]:
    names = {cls.__name__}
    for sub in cls.__subclasses__():
        names |= _error_names(sub)
    return names


class _HandledFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InputError) or type(exc).__name__ == "RunFailed":
            return False
        text = record.getMessage()
        if "RunFailed" in text and record.name.startswith("prefect.flow_runs"):
            return False
        if record.name.startswith("prefect.task_runs"):
            m = _FAILED_STATE.search(text)
            return m is None or m.group(1) not in _error_names()
        return True


# Failed(message='CheckpointError: ...') or Failed("TaskError: ...'...")
_FAILED_STATE = re.compile(r"Failed\((?:message=)?['\"](\w+): ")


_FILTER = _HandledFailures()


def quiet_handled_failures() -> None:
    """Install the filter on Prefect's console handlers (idempotent)."""
    from prefect.logging.handlers import APILogHandler

    for name in (None, "prefect", "prefect.flow_runs", "prefect.task_runs"):  # root: console
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler) and _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
