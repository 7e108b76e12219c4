"""The output lease: one holder at a time, a waiter gets it only after the holder let go, dead holders lose it."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from flows.lease import LEASE, OutputLease
from shardlight.core.errors import InputError

pytestmark = [pytest.mark.timeout(120)]
FORK = multiprocessing.get_context("fork")


def test_second_holder_is_refused_with_a_clear_message(tmp_path):
    with OutputLease(str(tmp_path)):
        assert (tmp_path / LEASE).exists()
        with pytest.raises(InputError, match="is in use by another run"):
            with OutputLease(str(tmp_path)):
                pass
    assert not (tmp_path / LEASE).exists()


class _CountingLease(OutputLease):
    """Sets `refused` the first time an acquisition attempt fails: the waiter has really met the holder."""

    def __init__(self, *args, refused: threading.Event, **kw):
        super().__init__(*args, **kw)
        self.refused = refused

    def _try_acquire(self) -> bool:
        got = super()._try_acquire()
        if not got:
            self.refused.set()
        return got


def _hold(out: str, held, release, released) -> None:
    with OutputLease(out):
        held.set()
        release.wait(60)
    released.set()  # after __exit__: the lease file is gone


def test_waiting_run_gets_the_lease_only_after_the_holder_released_it(tmp_path):
    held, release, released = FORK.Event(), FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold, args=(str(tmp_path), held, release, released))
    holder.start()
    assert held.wait(30)
    refused, order = threading.Event(), []

    def wait_for_lease():
        with _CountingLease(str(tmp_path), wait_s=60, refused=refused) as lease:
            order.append(("waiter acquired", released.is_set()))
            assert json.loads((tmp_path / LEASE).read_text())["id"] == lease.owner["id"]

    waiter = threading.Thread(target=wait_for_lease)
    waiter.start()
    assert refused.wait(30), "the waiter never tried"
    order.append(("holder releasing", released.is_set()))
    release.set()
    waiter.join(60)
    holder.join(30)
    # the waiter acquired after (never before) the holder's __exit__ removed its lease
    assert order == [("holder releasing", False), ("waiter acquired", True)]
    assert not (tmp_path / LEASE).exists()


def _write_record(tmp_path, **record) -> None:
    (tmp_path / LEASE).write_text(json.dumps({"host": socket.gethostname(), "id": "old", **record}))


def _taken_over(tmp_path) -> bool:
    try:
        with OutputLease(str(tmp_path)) as lease:
            assert json.loads((tmp_path / LEASE).read_text())["id"] == lease.owner["id"]
        return True
    except InputError:
        assert json.loads((tmp_path / LEASE).read_text())["id"] == "old"  # the refused run left it alone
        return False


def test_lease_of_a_dead_process_is_taken_over_a_live_ones_is_not(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_record(tmp_path, pid=alive.pid, expires=time.time() + 600)
        assert OutputLease(str(tmp_path)).held_by_another()  # what `shardlight run` checks before starting actors
        assert not _taken_over(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    _write_record(tmp_path, pid=alive.pid, expires=time.time() + 600)  # same record, its process now gone
    assert not OutputLease(str(tmp_path)).held_by_another()
    assert _taken_over(tmp_path)
    assert not (tmp_path / LEASE).exists()


def test_expired_lease_is_taken_over_an_unexpired_one_is_not(tmp_path):
    # another host's lease: its pid cannot be checked here, so only the expiry decides
    _write_record(tmp_path, host="elsewhere", pid=os.getpid(), expires=time.time() + 600)
    assert not _taken_over(tmp_path)
    _write_record(tmp_path, host="elsewhere", pid=os.getpid(), expires=time.time() - 1)
    assert not OutputLease(str(tmp_path)).held_by_another()
    assert _taken_over(tmp_path)
    assert not (tmp_path / LEASE).exists()
