"""`shardlight query` run many times on a busy machine: every call exits 0 with its answer.

Before the fix one call in ~36 on a loaded 2-core machine died with signal 6 ("terminate called without an
active exception") while the interpreter finalised alongside pyarrow's and torch's native threads. The
failure is intermittent, so this test makes the machine busy and repeats the call.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.index_helpers import make_real_run
from tests.test_cli import SHARDLIGHT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CALLS, AT_ONCE, K = 20, 2, 10


@pytest.fixture
def busy_machine():
    """A process burning CPU for the duration of the test (the load under which the abort appeared)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]
    yield
    for proc in burners:
        proc.kill()
        proc.wait()


def test_repeated_queries_under_load_all_exit_0(tmp_path, busy_machine):
    out = make_real_run(Path(tmp_path), shards=2, samples_per_shard=16)

    def query(i: int):
        text = ["a red circle", "a blue square"][i % 2]
        return subprocess.run([SHARDLIGHT, "query", str(out), text, "-k", str(K), "--json"], capture_output=True,
                              text=True, timeout=600)

    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(query, range(CALLS)))
    statuses = [r.returncode for r in results]
    assert statuses == [0] * CALLS, [(s, r.stderr[-300:]) for s, r in zip(statuses, results) if s != 0]
    for r in results:
        assert "terminate called" not in r.stderr
        hits = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(hits) == K and all("key" in h for h in hits)
