"""Shards read in a helper process: a GPU worker's own process only unpickles the samples.

At GPU rates the tar parsing, sample grouping and json of `ShardReader` (~50 µs per sample) are the largest
Python cost left in the worker's process, where they compete for the interpreter with the thread that
feeds the GPU. `ReaderProcess` keeps one spawned, torch-free process per worker that reads whole shards
with `ShardReader` and sends their items in small chunks through a pipe (back-pressure: it blocks when the
worker lags); `open(url)` returns a `RemoteShard` that iterates like a `ShardReader` and carries the same
`problem` and `members` once iterated. Invariants: items arrive in shard order, exactly as `ShardReader`
yields them; a consumer that stops early drains the pipe so the next shard starts clean; a reader process
that dies fails the shard with one line (and a fresh process serves the next one).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from shardlight.core.errors import ClusterError
from shardlight.core.storage import shard_name
from workers.reader import ShardReader

CHUNK = 64  # items per message: large enough to amortise a pipe round trip, small enough to stream
_END = "end"


def _serve(conn, stop) -> None:
    """The reader process: for each URL received, send the shard's items in chunks, then (END, problem,
    members); `stop` ends the current shard early."""
    while (url := conn.recv()) is not None:
        reader, chunk = ShardReader(url), []
        for item in reader:
            if stop.is_set():
                break
            chunk.append(item)
            if len(chunk) == CHUNK:
                conn.send(chunk)
                chunk = []
        if chunk and not stop.is_set():
            conn.send(chunk)
        conn.send((_END, reader.problem, reader.members))


class ReaderProcess:
    """One helper process that reads shards for a worker, one shard at a time."""

    def __init__(self):
        self._ctx = multiprocessing.get_context("spawn")  # the worker holds threads and a CUDA context
        self._proc = self._conn = self._stop = None
        self._active: RemoteShard | None = None  # the shard the process is sending, until its END is read
        self._lock = threading.Lock()

    def open(self, url: str) -> RemoteShard:
        return RemoteShard(url, self)

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = self._stop = self._active = None

    def _begin(self, shard: RemoteShard) -> None:
        with self._lock:
            if self._active is not None:  # an earlier shard abandoned mid-way and not yet drained
                self._drain_locked()
            if self._proc is None or not self._proc.is_alive():
                self._start()
            self._stop.clear()
            self._conn.send(shard.url)
            self._active = shard

    def _start(self) -> None:
        self.close()
        self._conn, child = self._ctx.Pipe()
        self._stop = self._ctx.Event()
        self._proc = self._ctx.Process(target=_serve, args=(child, self._stop), name="shard-reader", daemon=True)
        self._proc.start()
        child.close()

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self._proc = self._active = None
            raise ClusterError(f"the shard reader process died (exit code {code})") from None

    def _finish(self, shard: RemoteShard, end: tuple) -> None:
        _, shard.problem, shard.members = end
        self._active = None

    def _drain(self, shard: RemoteShard) -> None:
        """A consumer stopped reading `shard`: stop the process and read up to its END (idempotent)."""
        with self._lock:
            if self._active is shard:
                self._drain_locked()

    def _drain_locked(self) -> None:
        self._stop.set()
        try:
            while not isinstance(message := self._recv(), tuple):
                pass
            self._finish(self._active, message)
        except ClusterError:
            pass


@dataclass(eq=False)
class RemoteShard:
    """A shard read by a ReaderProcess; iterate it once, like a ShardReader."""

    url: str
    owner: ReaderProcess
    problem: str | None = None
    members: int = 0

    @cached_property
    def name(self) -> str:
        return shard_name(self.url)

    def __iter__(self) -> Iterator:
        owner = self.owner
        owner._begin(self)
        try:
            while not isinstance(message := owner._recv(), tuple):
                yield from message
            owner._finish(self, message)
        finally:
            owner._drain(self)  # nothing to do when the shard was read to its end
