"""Preloaded by the local Dask cluster's workers (distributed's ``worker.preload``).

When a run ends, the scheduler may close a moment before its workers, and a worker whose
heartbeat finds the connection gone logs the error with a traceback, after the run's work
is done. That one message is kept, as one line (WARNING, no traceback): the run's output
then ends with the run's outcome, not with distributed's shutdown.

Loaded by file path, so it needs nothing from the project's packages.
"""

import logging

_HEARTBEAT = "Failed to communicate with scheduler during heartbeat"


class _OneLineHeartbeatFailure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_HEARTBEAT) and record.exc_info:
            reason = record.exc_info[1]
            record.msg = f"{_HEARTBEAT}: {type(reason).__name__}: {reason}"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_worker_log = logging.getLogger("distributed.worker")
if not any(type(f).__name__ == _OneLineHeartbeatFailure.__name__ for f in _worker_log.filters):
    _worker_log.addFilter(_OneLineHeartbeatFailure())  # once, however often it is loaded
