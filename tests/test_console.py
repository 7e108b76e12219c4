"""What Prefect prints to a run's terminal: its server's docs advice cut to one line, from the first log line on."""

from __future__ import annotations

import logging

import prefect.server.api.server as prefect_server

import flows.ahead
from flows.console import NoDocsLinks, OneLineErrors, install_console_filters


def _record(message: str, *args) -> logging.LogRecord:
    return logging.getLogger("prefect").makeRecord("prefect", logging.INFO, __file__, 1, message, args, None)


def test_the_servers_advice_is_cut_to_its_first_line_and_installing_twice_adds_nothing():
    install_console_filters()
    install_console_filters()
    prefect = logging.getLogger("prefect")
    assert sum(isinstance(f, NoDocsLinks) for f in prefect.filters) == 1
    assert sum(isinstance(f, OneLineErrors) for f in logging.getLogger("prefect.flow_runs").filters) == 1
    record = _record("Starting temporary server on %s\nSee https://www.prefect.io/docs for more information",
                     "http://127.0.0.1:8980")
    assert prefect.filter(record) and record.getMessage() == "Starting temporary server on http://127.0.0.1:8980"
    kept = _record("Stopping temporary server on http://127.0.0.1:8980")
    assert prefect.filter(kept) and kept.getMessage() == "Stopping temporary server on http://127.0.0.1:8980"


def test_the_filter_is_in_place_before_the_server_started_ahead_can_log(monkeypatch):
    """`shardlight run` starts Prefect's server from a thread before it imports the flow (flows/ahead.py)."""
    prefect = logging.getLogger("prefect")
    for f in [f for f in prefect.filters if isinstance(f, NoDocsLinks)]:
        prefect.removeFilter(f)
    seen = []

    class Server:  # stands in for the uvicorn subprocess: only the order of events is under test here
        def start(self):
            seen.append(any(isinstance(f, NoDocsLinks) for f in prefect.filters))

    monkeypatch.setattr(prefect_server, "SubprocessASGIServer", Server)
    monkeypatch.setattr(flows.ahead, "_flow_starts_a_server", lambda: True)  # a session server may be configured
    thread = flows.ahead._start_prefect_server()
    assert thread is not None
    thread.join(timeout=30)
    assert seen == [True]
