"""Ctrl-C during a run: stop within seconds, say so in one line, leave no process behind.

Left to itself, a SIGINT sent to the terminal's process group kills the temporary Prefect server with the
driver still talking to it: the driver then logs a connection error and hangs in Prefect's exit drain. So
while a run is in progress the CLI owns SIGINT and SIGTERM: the first one prints "interrupted; run the same
command to resume", stops every process this run started (the temporary Prefect server, Ray's GCS, raylet
and workers — all descendants of this process), releases the output's lease and exits 130 without running
the exit hooks that would wait on the dead server. Further Ctrl-Cs are ignored while it stops (a few
seconds at most); a second SIGTERM exits at once.

Nothing finished is lost: every output file appears by atomic rename, so a killed worker leaves at most a
hidden `.NAME.tmp` file, which is removed here too; the next run skips finished shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from shardlight.core.layout import ROW_SOURCES
from shardlight.core.processes import alive
from shardlight.core.storage import is_local, local_path

MESSAGE = "interrupted; run the same command to resume"
EXIT_CODE = 130  # 128 + SIGINT, as shells report it
GRACE_S = 3.0  # SIGTERM first (Ray's processes shut down cleanly), then SIGKILL


def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (Linux); empty elsewhere."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, …)."""
    tree, found, todo = _children_map(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_descendants(grace_s: float = GRACE_S) -> None:
    """SIGTERM every descendant, then SIGKILL those still alive after `grace_s`."""
    pids = descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [p for p in pids + descendants(os.getpid()) if alive(p)]
        if not pids:
            return


def _tidy_output(out: str) -> None:
    """Remove this process's lease and the temporary files killed writers left (finished files are untouched)."""
    if not is_local(out):
        return
    root = Path(local_path(out))
    lease = root / "_lease.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(lease.read_text()).get("pid") == os.getpid():
            lease.unlink()
    for folder in ("errors", *ROW_SOURCES):
        for tmp in (root / folder).glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def stop_cleanly_on_interrupt(out: str | None) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM stop the run as the module docstring says (main thread only)."""
    stopping = False

    def handler(signum, frame) -> None:
        nonlocal stopping
        if stopping:
            os._exit(EXIT_CODE)
        stopping = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal may send it again while we stop
        stop_descendants()
        if out:
            _tidy_output(out)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.write(2, f"\n{MESSAGE}\n".encode())  # on its own line, below a progress bar's
        os._exit(EXIT_CODE)  # not sys.exit: Prefect's exit hooks would wait on the server we just stopped

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
