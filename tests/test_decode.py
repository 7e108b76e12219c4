"""Parallel decoding changes nothing in the output: rows, order, vectors and errors are those of one worker,
on clean and damaged shards, and a decode process killed mid-shard loses and duplicates no row."""

import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec
from shardlight.core.errors import ClusterError
from shardlight.models.preprocess import PixelSpec
from shardlight.training.synthetic import write_shards
from tests.conftest import running
from workers import decode_job
from workers.decode import CpuDecoder, DecodeSpecs, chunks, produced_ahead
from workers.embed import ShardEmbedder
from workers.reader import RawSample, ShardReader

pytestmark = pytest.mark.timeout(300)

SPEC = PixelSpec(resize=64, size=64, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
LABELS = LabelSpec(kind="vit", model="shapes-vit", top_k=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, one_torch_thread):
    from tests.conftest import write_damaged_shards

    root = tmp_path_factory.mktemp("decode")
    damaged = write_damaged_shards(root)
    big = write_shards(root / "big", shards=1, samples_per_shard=30, seed=5)[0]
    return sorted(str(p) for p in damaged["dir"].iterdir()) + [str(big)]


def _embed_all(shards, out, **compute) -> None:
    embedder = ShardEmbedder(ClipSpec(model="shapes-clip"), LABELS, ComputeSpec(batch_size=4, **compute))
    try:
        for shard in shards:
            embedder.process(shard, str(out))
    finally:
        embedder.close()


def _tables(out, kind, name):
    return pq.read_table(f"{out}/{kind}/{name}.parquet")


@pytest.mark.parametrize("schedule", ["beside", "between"])
def test_many_decode_workers_write_what_one_writes(shards, tmp_path, schedule):
    one, many = tmp_path / "one", tmp_path / "many"
    _embed_all(shards, one, decode_workers=0, decode_schedule="beside")
    _embed_all(shards, many, decode_workers=3, decode_schedule=schedule)
    for shard in shards:
        name = os.path.basename(shard).removesuffix(".tar")
        a, b = _tables(one, "embeddings", name), _tables(many, "embeddings", name)
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        for col in ("image_embedding", "text_embedding"):
            va = [np.zeros(1) if v is None else np.array(v) for v in a.column(col).to_pylist()]
            vb = [np.zeros(1) if v is None else np.array(v) for v in b.column(col).to_pylist()]
            assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(va, vb))
        same = [c for c in a.column_names if c not in ("image_embedding", "text_embedding", "clip_score",
                                                       "label_prob", "topk_probs")]
        assert a.select(same).equals(b.select(same))
        assert _tables(one, "errors", name).equals(_tables(many, "errors", name))
    errors = _tables(many, "errors", "00001").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors if e["dropped"]] == [("b0001", "decode")]
    assert _tables(many, "embeddings", "00003").num_rows > 0  # the rows before the cut in the truncated tar


def _decode(decoder, shard, kill_after=None):
    keys, pixels = [], []
    for i, batch in enumerate(decoder.batches(ShardReader(shard))):
        keys += [s.raw.key for s in batch.samples]
        pixels.append(batch.clip)
        if i == kill_after:
            os.kill(decoder.pids()[0], signal.SIGKILL)
            time.sleep(0.5)  # the pool notices the death before the next chunk is collected
    return keys, torch.cat(pixels)


@pytest.mark.parametrize("between", [False, True])
def test_batches_are_fixed_size_uint8_in_shard_order(shards, between):
    decoder = CpuDecoder(DecodeSpecs(SPEC), workers=2, batch_size=4, between=between)
    try:
        sizes = [len(b.samples) for b in decoder.batches(ShardReader(shards[-1]))]
        batch = next(iter(decoder.batches(ShardReader(shards[-1]))))
    finally:
        decoder.close()
    assert sizes == [4] * 7 + [2] and batch.clip.dtype == torch.uint8 and batch.clip.shape == (4, 3, 64, 64)


@pytest.mark.parametrize("between", [False, True])
def test_a_decode_worker_killed_mid_shard_loses_and_duplicates_nothing(shards, between):
    expected_keys, expected = _decode(CpuDecoder(DecodeSpecs(SPEC), workers=0, batch_size=4), shards[-1])
    decoder = CpuDecoder(DecodeSpecs(SPEC), workers=2, batch_size=4, prefetch=1, between=between)
    try:
        keys, pixels = _decode(decoder, shards[-1], kill_after=0)
        assert decoder.restarts == 1
        spill = decoder._spill
    finally:
        decoder.close()
    assert keys == expected_keys and len(keys) == 30 and torch.equal(pixels, expected)
    assert not os.path.exists(spill)  # a killed process's unread result files go with the worker


class _CountingTransform:
    """A transform (no PixelSpec) that counts the images it was given: thread workers share it."""

    def __init__(self):
        self.calls, self.lock = 0, threading.Lock()

    def __call__(self, image):
        with self.lock:
            self.calls += 1
        return torch.zeros(3, 8, 8)


@pytest.mark.parametrize("between", [False, True])
def test_between_batches_nothing_decodes_while_the_consumer_holds_a_batch(shards, between):
    counting = _CountingTransform()
    decoder = CpuDecoder(DecodeSpecs(counting), workers=2, batch_size=4, mode="thread", prefetch=2,
                         between=between)
    try:
        batches = decoder.batches(ShardReader(shards[-1]))
        first = next(batches)
        time.sleep(0.5)  # the model's turn: beside, the conductor decodes ahead meanwhile
        held = counting.calls
        rest = sum(len(b.samples) for b in batches)
    finally:
        decoder.close()
    assert len(first.samples) == 4 and len(first.samples) + rest == 30
    if between:
        assert held == 4  # exactly the batch handed over
    else:
        assert held > 4


def test_decode_workers_that_keep_dying_fail_the_shard_in_one_line(shards):
    decoder = CpuDecoder(DecodeSpecs(SPEC), workers=2, batch_size=4, prefetch=1, max_restarts=0)
    try:
        with pytest.raises(ClusterError, match="decode workers died 1 times"):
            _decode(decoder, shards[-1], kill_after=0)
    finally:
        decoder.close()


def test_decode_processes_start_before_the_first_shard_and_one_lost_there_costs_nothing(shards):
    expected_keys, expected = _decode(CpuDecoder(DecodeSpecs(SPEC), workers=0, batch_size=4), shards[-1])
    decoder = CpuDecoder(DecodeSpecs(SPEC), workers=2, batch_size=4)
    try:
        decoder.start()
        assert len(decoder.pids()) == 2  # started with no shard in sight
        os.kill(decoder.pids()[0], signal.SIGKILL)
        time.sleep(0.5)
        keys, pixels = _decode(decoder, shards[-1])
        assert decoder.restarts == 1
    finally:
        decoder.close()
    assert keys == expected_keys and torch.equal(pixels, expected)


def test_a_decode_process_replies_with_a_path_short_enough_for_one_atomic_pipe_write(shards, tmp_path,
                                                                                       monkeypatch):
    # A reply longer than PIPE_BUF, cut by a kill, would hang Python's ProcessPoolExecutor for good.
    big = PixelSpec(resize=256, size=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    monkeypatch.setattr(decode_job, "_SPECS", DecodeSpecs(big))
    jobs = [(r.image, r.image_format) for r in ShardReader(shards[-1]) if isinstance(r, RawSample)][:16]
    reply = decode_job.decode_chunk_to_file(jobs, str(tmp_path))
    assert isinstance(reply, str) and len(pickle.dumps(reply)) < select.PIPE_BUF // 4
    results = decode_job.read_chunk_file(reply)
    expected = decode_job.decode_chunk(jobs, DecodeSpecs(big))
    assert len(pickle.dumps(expected)) > 16 * 256 * 256 * 3  # what used to go through the pipe
    assert not os.listdir(tmp_path)  # read once, then gone
    assert len(results) == 16
    for got, want in zip(results, expected):
        assert got[:2] == want[:2] and np.array_equal(got[2], want[2])


_KILLED_OWNER = """
import sys, time
sys.path.insert(0, {repo!r})
from shardlight.models.preprocess import PixelSpec
from workers.decode import CpuDecoder, DecodeSpecs, chunks, produced_ahead
decoder = CpuDecoder(DecodeSpecs(PixelSpec(16, 16, "bicubic", (0.5,) * 3, (0.5,) * 3)), workers=2)
decoder.start()
print(decoder._spill, *decoder.pids(), flush=True)
time.sleep(120)
"""


def test_a_killed_worker_leaves_neither_decode_processes_nor_their_results_folder():
    owner = subprocess.Popen([sys.executable, "-c", _KILLED_OWNER.format(repo=str(Path(__file__).parent.parent))],
                             stdout=subprocess.PIPE, text=True)
    try:
        folder, *pids = owner.stdout.readline().split()
        assert os.path.isdir(folder) and len(pids) == 2
        time.sleep(2)  # the decode processes are up and watching their parent
        owner.kill()  # as ray.kill or the OOM killer would: no close(), no finalizer
        owner.wait(timeout=30)
        deadline = time.monotonic() + 15
        while (os.path.exists(folder) or any(running(int(p)) for p in pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not os.path.exists(folder)
        assert not any(running(int(p)) for p in pids)
    finally:
        owner.kill()
        owner.stdout.close()


def test_a_new_worker_removes_results_folders_whose_owner_is_gone(tmp_path, monkeypatch):
    import workers.decode as decode

    monkeypatch.setattr(decode.tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"shardlight-decode-{gone}-abc"
    live = tmp_path / f"shardlight-decode-{os.getppid()}-abc"  # a running process's: kept
    for folder in (stale, live):
        folder.mkdir()
        (folder / "x.chunk").write_bytes(b"results")
    mine = decode._results_folder()
    assert not stale.exists() and live.exists()
    assert os.path.basename(mine).startswith(f"shardlight-decode-{os.getpid()}-")


def test_produced_ahead_keeps_order_raises_the_producers_error_after_its_items_and_stops_with_the_consumer():
    def produce(put):
        for i in range(5):
            put(i)
        raise ValueError("bad tar")

    seen = []
    with pytest.raises(ValueError, match="bad tar"):
        for item in produced_ahead(produce, 2, "test-producer"):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]

    produced = []

    def endless(put):
        for i in range(10**9):
            produced.append(i)
            put(i)

    items = produced_ahead(endless, 2, "test-endless")
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # the consumer stops: the producer unwinds and its thread is joined
    assert not any(t.name == "test-endless" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # it ran at most `depth` (plus the one in its hand) ahead


def test_chunks_count_images_and_carry_the_errors_between_them():
    raw = [RawSample(key=str(i), shard="s", image=b"", image_format="jpg", caption=None, meta={},
                     tar_offset=None, tar_size=None) for i in range(5)]
    items = [raw[0], "err-a", raw[1], raw[2], "err-b", "err-c", raw[3], raw[4], "err-d"]
    assert list(chunks(items, 2)) == [[raw[0], "err-a", raw[1]], [raw[2], "err-b", "err-c", raw[3]],
                                      [raw[4], "err-d"]]
