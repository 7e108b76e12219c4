import json
import multiprocessing
import os
import socket
import time

import pytest

from flows.lease import LEASE, OutputLease
from shardlight.core.errors import InputError


def test_second_holder_is_refused_with_a_clear_message(tmp_path):
    with OutputLease(str(tmp_path)):
        assert (tmp_path / LEASE).exists()
        with pytest.raises(InputError, match="is in use by another run"):
            with OutputLease(str(tmp_path)):
                pass
    assert not (tmp_path / LEASE).exists()


def test_waiting_run_gets_the_lease_when_the_first_finishes(tmp_path):
    def hold():
        with OutputLease(str(tmp_path)):
            time.sleep(1.5)

    proc = multiprocessing.get_context("fork").Process(target=hold)
    proc.start()
    while not (tmp_path / LEASE).exists():
        time.sleep(0.05)
    start = time.monotonic()
    with OutputLease(str(tmp_path), wait_s=30):
        waited = time.monotonic() - start
    proc.join()
    assert waited > 0.5  # it really waited for the holder


def test_lease_of_a_dead_process_or_expired_is_taken_over(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    record = {"host": socket.gethostname(), "pid": dead.pid, "id": "x", "expires": time.time() + 600}
    (tmp_path / LEASE).write_text(json.dumps(record))
    with OutputLease(str(tmp_path)) as lease:
        assert json.loads((tmp_path / LEASE).read_text())["id"] == lease.owner["id"]
    record = {"host": "elsewhere", "pid": os.getpid(), "id": "y", "expires": time.time() - 1}
    (tmp_path / LEASE).write_text(json.dumps(record))
    with OutputLease(str(tmp_path)):
        pass
