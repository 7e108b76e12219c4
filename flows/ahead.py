"""What `shardlight run` starts before its Prefect flow, so that start-ups overlap instead of queueing.

A run's fixed costs are mostly waiting: Prefect's temporary server (a uvicorn process, ~10 s on 2 cores), the
local Ray's daemons (~5 s) and each shard actor's imports and model loading (~9 s). The flow would start them
one after the other; `started_ahead` starts all three at once, before the flow:
- the Prefect server from a thread (only when no PREFECT_API_URL is set, so the flow would start the same
  temporary server itself); the flow begins only after that thread has finished, so it never talks to a
  server that is not up yet, and a start that failed there is simply retried by the flow, with Prefect's error;
- Ray from the calling thread (Ray ties its daemons' lives to the thread that starts them), then the shard
  actors (`workers/pool.py: start_ahead`), which the shard stage claims; any left unclaimed are killed at the
  end, and Ray, when started here, stays up for the whole flow (the index stage uses it too) and is shut
  down after it.
Only then does the driver import the flow itself (torch, Prefect's engine: seconds on 2 cores), so the actors'
start and the server's overlap the driver's own imports; the CLI imports nothing heavy before this point.
Nothing is started ahead when every shard is done, or while another run holds the output (this run will wait
for it, or refuse). A flow started another way (a deployment, `pipeline()` from Python) starts it all itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import ray

from flows.console import install_console_filters
from flows.lease import OutputLease
from shardlight.core.config import RunConfig
from shardlight.core.layout import stages_todo
from shardlight.core.storage import list_shards
from workers.pool import connect, release_ahead

log = logging.getLogger("shardlight")


@contextlib.contextmanager
def started_ahead(cfg: RunConfig) -> Iterator[None]:
    """Around a `pipeline(cfg)` call: its Prefect server, Ray and shard actors start now, side by side."""
    server = _start_prefect_server()
    todo = stages_todo(cfg.output, list_shards(cfg.input), cfg.augment.enabled)
    if todo and OutputLease(cfg.output).held_by_another():
        todo = []
    started = False
    try:
        if todo:
            started = connect(cfg.ray)
            from workers.shard_worker import start_shard_workers_ahead  # torch-free: the actors import the models

            plan = start_shard_workers_ahead(cfg, len(todo))
            log.info("Ray: starting %s while the flow starts", plan.describe())
        import flows.pipeline  # noqa: F401 - the flow's modules (torch, Prefect's engine) load while all that starts
        if server is not None:
            server.join()
        yield
    finally:
        release_ahead()
        if started:
            ray.shutdown()


def _flow_starts_a_server() -> bool:
    """Whether the flow would start Prefect's temporary server: no server configured, temporary ones allowed."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def _start_prefect_server() -> threading.Thread | None:
    """Start the temporary Prefect server the flow would start, in a thread; None when the flow would not."""
    if not _flow_starts_a_server():
        return None
    install_console_filters()  # before the server's first log line, which the thread may write at once

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            SubprocessASGIServer().start()  # the instance the flow's client asks for: it finds it running
        except Exception as err:  # noqa: BLE001 - the flow starts it again and reports Prefect's own error
            log.debug("starting Prefect's server ahead failed (%s); the flow will start it", err)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread
