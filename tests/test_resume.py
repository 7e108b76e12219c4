"""Kill the driver mid-run, run again: the result equals an uninterrupted run's. Two runs at once: one refuses."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from index.search import Searcher
from shardlight.training.synthetic import write_shards
from tests.conftest import SHARDLIGHT, SMALL_RUN_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_shards(root / "data", shards=5, samples_per_shard=120, seed=41)
    (root / "cfg.yaml").write_text(SMALL_RUN_CONFIG)
    return root


def start(root, out, home=None, **kw):
    # Each run its own Prefect home: two temporary Prefect servers on one SQLite file log Prefect's own
    # "database is locked" tracebacks (a known upstream limitation; docs/operations.md).
    env = {**os.environ, "PREFECT_HOME": str(root / f"prefect-{home or out}"), "COLUMNS": "200"}
    return subprocess.Popen([SHARDLIGHT, "run", str(root / "cfg.yaml"), "-i", str(root / "data"), "-o",
                             str(root / out)], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=400):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def tables(out: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted((out / "embeddings").glob("*.parquet"))}


def settled(folder: Path, quiet_s: float = 3.0, limit_s: float = 60.0) -> dict:
    """The finished shards once none has appeared for `quiet_s`: Ray's raylet kills a dead driver's actors
    within a moment, not at once, and an actor may finish (atomically) the shard it was writing meanwhile."""
    seen, since, deadline = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return seen


def test_killed_driver_then_rerun_equals_uninterrupted_run(setup):
    root = setup
    proc = start(root, "killed")
    done_dir = root / "killed" / "embeddings"
    deadline = time.monotonic() + 300
    while not (done_dir.exists() and list(done_dir.glob("*.parquet"))):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before any shard finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = settled(done_dir)
    errors_dir = root / "killed" / "errors"
    finished_errors = {p.name: p.stat().st_mtime_ns for p in errors_dir.glob("*.parquet") if p.name in finished}
    assert 1 <= len(finished) < 5, "killed mid-run"
    stale = done_dir / f".{sorted(finished)[0]}.0badf00d.tmp"  # what a write killed before its rename leaves
    stale.write_bytes(b"half a parquet file")

    rc, out, err = finish(start(root, "killed"))
    assert rc == 0, err
    summary = json.loads((root / "killed" / "run.json").read_text())["summary"]
    assert summary["skipped"] == len(finished) and summary["processed"] == 5 - len(finished)
    # the finished shards were not touched: same files, same mtime_ns
    assert {n: (done_dir / n).stat().st_mtime_ns for n in finished} == finished
    assert {n: (errors_dir / n).stat().st_mtime_ns for n in finished_errors} == finished_errors
    assert not list((root / "killed").rglob(".*.tmp")), "a temporary file was left behind"
    rc, _, err = finish(start(root, "clean"))
    assert rc == 0, err

    killed, clean = tables(root / "killed"), tables(root / "clean")
    assert list(killed) == list(clean) == [f"{i:05d}.parquet" for i in range(5)]
    for name in clean:
        assert killed[name].drop_columns([]).equals(clean[name]), name
    a, b = Searcher(root / "killed"), Searcher(root / "clean")
    for query in ("a red circle", "a blue star"):
        assert [h.key for h in a.search(text=query, k=10)] == [h.key for h in b.search(text=query, k=10)]


def test_two_runs_on_one_output_one_refuses(setup):
    root = setup
    first, second = start(root, "shared", home="first"), start(root, "shared", home="second")
    results = [finish(first), finish(second)]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, _, err in results if rc == 2)
    assert "is in use by another run" in refused and "Traceback" not in refused
    assert len(tables(root / "shared")) == 5
    assert not (root / "shared" / "_lease.json").exists()
