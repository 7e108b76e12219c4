"""Ctrl-C mid-run, as a terminal sends it (SIGINT to the process group): the run stops within 10 s with one
line, keeps every finished Parquet, leaves no Ray or Prefect process, and the same command then finishes."""

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.interrupt import MESSAGE, descendants
from shardlight.training.synthetic import write_shards
from tests.conftest import SHARDLIGHT, SMALL_RUN_CONFIG, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHARDS, SAMPLES = 4, 96


def _session(sid: int) -> set[int]:
    """Processes in session `sid` (what a terminal's Ctrl-C reaches)."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(entry.name)) == sid:
                found.add(int(entry.name))
        except (ProcessLookupError, PermissionError):
            pass
    return found


def _command(root: Path) -> list[str]:
    return [SHARDLIGHT, "run", str(root / "cfg.yaml"), "-i", str(root / "data"), "-o", str(root / "out")]


def test_ctrl_c_stops_within_10s_keeps_finished_shards_and_resumes(tmp_path):
    write_shards(tmp_path / "data", shards=SHARDS, samples_per_shard=SAMPLES, seed=61)
    (tmp_path / "cfg.yaml").write_text(SMALL_RUN_CONFIG)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(_command(tmp_path), env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=log)
    embeddings = tmp_path / "out" / "embeddings"
    deadline = time.monotonic() + 400
    while not (embeddings.exists() and list(embeddings.glob("*.parquet"))):  # the first finished shard
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before any shard finished"
        time.sleep(0.1)
    family = set(descendants(proc.pid)) | _session(proc.pid)
    finished = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in embeddings.glob("*.parquet")}

    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 10 s of Ctrl-C")
    log.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].strip() == MESSAGE and "Traceback" not in stderr, stderr[-3000:]
    for name, digest in finished.items():
        assert hashlib.sha256((embeddings / name).read_bytes()).hexdigest() == digest
        assert pq.read_table(embeddings / name).num_rows == SAMPLES
    # Processes told to stop may still be tearing down (an empty cmdline: exiting) when the command returns;
    # what must not happen is one that stays.
    settle = time.monotonic() + 10
    while (left := [p for p in family if running(p)]) and time.monotonic() < settle:
        time.sleep(0.2)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if running(p)]
    assert not (tmp_path / "out" / "_lease.json").exists()
    assert not list((tmp_path / "out").glob("*/.*.tmp"))

    again = subprocess.run(_command(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in embeddings.glob("*.parquet")) == [f"{i:05d}.parquet" for i in range(SHARDS)]
    assert sum(pq.read_table(p).num_rows for p in embeddings.glob("*.parquet")) == SHARDS * SAMPLES
    for name, digest in finished.items():  # resumed, not redone
        assert hashlib.sha256((embeddings / name).read_bytes()).hexdigest() == digest
