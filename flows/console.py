"""What Prefect prints to a run's terminal: each message one line, expected failures without a traceback.

`install_console_filters()` is idempotent and must run before anything can make Prefect log: `flows/ahead.py`
starts Prefect's temporary server from a thread before the flow's own modules load, so the filters cannot
wait for `flows/pipeline.py` to be imported (the server's first log line would race them).
"""

from __future__ import annotations

import logging

from shardlight.core.errors import ShardlightError


class OneLineErrors(logging.Filter):
    """Expected failures (ShardlightError) are logged as their message, without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ShardlightError):
            record.exc_info, record.exc_text = None, None
        return True


class NoDocsLinks(logging.Filter):
    """Prefect's "Starting temporary server on URL" comes with a second line, "See https://… for more
    information on running a dedicated Prefect server": advice for Prefect users that splits the console
    (and the progress bar after it). The first line is kept; README.md says how to use a running server."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\nSee https://" in message:
            record.msg, record.args = message.split("\nSee https://", 1)[0], ()
        return True


_FILTERS = {"prefect.task_runs": OneLineErrors, "prefect.flow_runs": OneLineErrors,
            "prefect": NoDocsLinks}  # "prefect": the logger Prefect's temporary server logs with


def install_console_filters() -> None:
    for name, kind in _FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
