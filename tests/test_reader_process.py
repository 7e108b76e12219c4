"""Shards read in a helper process (workers/reader_process.py) give exactly what ShardReader gives."""

from __future__ import annotations

import os
import signal

import pytest

from shardlight.core.errors import ClusterError
from shardlight.training.synthetic import write_shards
from workers.reader import ShardReader
from workers.reader_process import ReaderProcess


@pytest.fixture
def reading():
    process = ReaderProcess()
    yield process
    process.close()


def _same_as_shard_reader(reading: ReaderProcess, url: str) -> None:
    local, remote = ShardReader(url), reading.open(url)
    assert list(remote) == list(local)
    assert (remote.problem, remote.members, remote.name) == (local.problem, local.members, local.name)


def test_items_and_problems_match_the_shard_reader(reading, damaged_shards, tmp_path):
    shards = sorted(damaged_shards["dir"].glob("*.tar")) + write_shards(tmp_path / "p", 1, 150, seed=1)
    for shard in shards:  # healthy, corrupt image + missing caption, empty, truncated; 150 samples (3 chunks)
        _same_as_shard_reader(reading, str(shard))


def test_a_shard_abandoned_midway_does_not_leak_into_the_next(reading, tmp_path):
    first, second = write_shards(tmp_path / "p", 2, 200, seed=2)
    items = iter(reading.open(str(first)))
    assert next(items).key == "000000000"
    del items  # a consumer that stopped (its generator is closed or just dropped)
    _same_as_shard_reader(reading, str(second))
    partial = reading.open(str(first))
    for i, _ in enumerate(partial):
        if i == 70:
            break
    _same_as_shard_reader(reading, str(second))  # the abandoned shard is drained before the next starts


def test_a_dead_reader_process_fails_the_shard_in_one_line_then_recovers(reading, tmp_path):
    shard = write_shards(tmp_path / "p", 1, 600, seed=3, image_size=32)[0]
    items = iter(reading.open(str(shard)))
    next(items)
    os.kill(reading._proc.pid, signal.SIGKILL)
    with pytest.raises(ClusterError, match="shard reader process died"):
        list(items)
    _same_as_shard_reader(reading, str(shard))


def test_a_worker_with_reading_and_tokenising_helpers_writes_the_same_outputs(damaged_shards, tmp_path, monkeypatch):
    """What a GPU worker with spare CPUs runs (reader process + tokenising processes), here on the CPU."""
    import numpy as np
    import pyarrow.parquet as pq

    import workers.embed as embed
    from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec

    def run(helpers: int, out):
        monkeypatch.setattr(embed, "text_processes", lambda device, cpus: helpers)
        worker = embed.ShardEmbedder(ClipSpec(model="shapes-clip"), LabelSpec(kind="none"),
                                     ComputeSpec(batch_size=4, decode_workers=0))
        assert (worker.text is not None) == (worker.reading is not None) == bool(helpers)
        try:
            return [worker.process(str(s), str(out)) for s in sorted(damaged_shards["dir"].glob("*.tar"))]
        finally:
            worker.close()

    plain, helped = run(0, tmp_path / "plain"), run(1, tmp_path / "helped")
    for a, b in zip(plain, helped):
        assert {k: v for k, v in a.items() if k not in ("seconds", "images_per_s")} == \
            {k: v for k, v in b.items() if k not in ("seconds", "images_per_s")}
    for folder in ("embeddings", "errors"):
        for path in sorted((tmp_path / "plain" / folder).glob("*.parquet")):
            want, got = pq.read_table(path).to_pylist(), pq.read_table(tmp_path / "helped" / folder / path.name).to_pylist()
            assert [r["key"] for r in got] == [r["key"] for r in want]
            for r, s in zip(got, want):
                for key in r:
                    if key.endswith("embedding") and r[key] is not None:
                        assert np.allclose(r[key], s[key], atol=1e-5)
                    elif key != "clip_score":
                        assert r[key] == s[key], key
