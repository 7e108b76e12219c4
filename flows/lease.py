"""One writer per output folder: a lease file that a running flow holds and renews.

`OUT/_lease.json` names the owner (host, pid, run id) and an expiry. A second run on the same output
waits for the lease (up to `wait_s`) or refuses with one line naming the holder. A lease whose owner is
gone (a dead pid on this host, or an expiry in the past) is taken over, so a killed run never blocks the
next one for long. Locally the lease is created with O_EXCL; on object stores a write-then-read check is
the best available (documented in docs/cluster.md).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from shardlight.core.errors import InputError
from shardlight.core.storage import exists, filesystem, is_local, join, local_path, read_bytes, write_atomic

LEASE = "_lease.json"


class OutputLease:
    def __init__(self, out: str, ttl_s: float = 60.0, wait_s: float = 0.0):
        self.url = join(out, LEASE)
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLease:
        deadline = time.monotonic() + self.wait_s
        while not self._try_acquire():
            if time.monotonic() >= deadline:
                holder = self._read() or {}
                raise InputError(
                    f"{self.url.rsplit('/', 2)[0]} is in use by another run (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}); wait for it to finish, or delete {self.url} if it is dead")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name="lease-renew", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if (self._read() or {}).get("id") == self.owner["id"]:
            fs, path = filesystem(self.url)
            fs.rm(path)

    def held_by_another(self) -> bool:
        """Whether a live run holds the lease now (a dead or expired holder does not count)."""
        return exists(self.url) and not self._stale(self._read())

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.ttl_s}).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.url))
        except (FileNotFoundError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None or holder.get("expires", 0) < time.time():
            return True
        if holder.get("host") == self.owner["host"] and holder.get("pid") != self.owner["pid"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, TypeError):
                return False
        return False

    def _try_acquire(self) -> bool:
        if exists(self.url):
            if not self._stale(self._read()):
                return False
            fs, path = filesystem(self.url)
            fs.rm(path)
        if is_local(self.url):
            path = Path(local_path(self.url))
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return True
        write_atomic(self.url, self._record())
        time.sleep(0.5)  # object stores: the last writer wins; read back to see who that was
        return (self._read() or {}).get("id") == self.owner["id"]

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if (self._read() or {}).get("id") == self.owner["id"]:
                write_atomic(self.url, self._record())
