"""shardlight.core.processes.alive: running, exited-but-unreaped (zombie) and reaped processes."""

import os
import subprocess
import sys
import time

import pytest

from shardlight.core.processes import alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are told apart through /proc")
def test_a_running_process_is_alive_and_a_zombie_or_reaped_one_is_not():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert alive(child.pid) and alive(os.getpid())
        child.stdin.close()  # it exits; not reaped until wait(): a zombie meanwhile
        deadline = time.monotonic() + 30
        while alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(f"/proc/{child.pid}") and not alive(child.pid)
    finally:
        child.wait(timeout=30)
    assert not alive(child.pid)
