"""The index at scale: float16 re-rank file, parts merged on disk, memory-mapped opening, incremental add through
parts, failed and killed builds leaving the previous index serving. Ray builds: tests/test_index_ray.py."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from index_helpers import clustered, write_shard

from index import build as build_module
from index.build import BuildSpec, build_index, load_index, read_meta
from index.parts import add_part, build_in_parts, merge_block_lists
from index.rerank import Float16Writer, attach, create, detach, open_vectors, write_rows
from index.search import Searcher
from index.update import update_index
from index.vectors import index_files, sample
from shardlight.core.errors import IndexStateError

DIM = 32
RERANKED = "IVF16,PQ8x4fs,Refine(SQfp16)"


def _mapped(path: Path) -> bool:
    """Whether this process has `path` memory-mapped."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def _exact_top10(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ vectors.astype(np.float16).astype(np.float32).T), axis=1)[:, :10]


def _search_everything(index: faiss.Index, queries: np.ndarray) -> np.ndarray:
    """Top-10 ids probing every list and re-ranking every candidate: exact over the float16 rows."""
    faiss.extract_index_ivf(index).nprobe = faiss.extract_index_ivf(index).nlist
    index.k_factor = index.ntotal / 10
    return index.search(queries, 10)[1]


def test_float16_file_is_faiss_format_streamed_or_written_in_ranges(tmp_path):
    x = clustered(1000, DIM)
    streamed, ranged = str(tmp_path / "a.faiss"), str(tmp_path / "b.faiss")
    writer = Float16Writer(streamed, DIM, 1000)
    writer.write(x[:300])
    writer.write(x[300:])
    writer.close()
    create(ranged, DIM, 1000)
    write_rows(ranged, DIM, 600, x[600:])  # out of order, as parallel build tasks finish
    write_rows(ranged, DIM, 0, x[:600])
    assert Path(streamed).read_bytes() == Path(ranged).read_bytes()
    in_ram, mapped = faiss.read_index(streamed), open_vectors(streamed)
    assert mapped.ntotal == in_ram.ntotal == 1000 and _mapped(Path(streamed))
    assert np.array_equal(mapped.reconstruct_n(0, 1000), x.astype(np.float16).astype(np.float32))
    assert np.array_equal(mapped.search(x[:5], 3)[1], in_ram.search(x[:5], 3)[1])


def test_reranked_index_keeps_codes_in_ram_and_maps_the_vectors(tmp_path):
    vectors = clustered(4000, DIM)
    write_shard(tmp_path, "00000", vectors)
    meta = build_index(str(tmp_path), RERANKED, tune_queries=100)
    folder = tmp_path / "index"
    assert meta["factory"] == RERANKED and set(meta["tuning"]["params"]) == {"nprobe", "k_factor_rf"}
    vectors_file = folder / meta["files"]["vectors"]
    assert vectors_file.stat().st_size >= 4000 * DIM * 2
    assert (folder / meta["files"]["index"]).stat().st_size < 4000 * DIM  # codes only: no float rows inside
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
    index, _, _ = load_index(str(tmp_path))
    assert _mapped(vectors_file)
    base, mapped = detach(index)
    assert mapped.ntotal == base.ntotal == 4000 and index.k_factor == meta["tuning"]["params"]["k_factor_rf"]
    queries = clustered(50, DIM, fresh=1)
    assert np.array_equal(_search_everything(index, queries), _exact_top10(queries, vectors))
    s = Searcher(str(tmp_path))
    assert np.allclose(s.vector_of_id(7), vectors[7], atol=1e-3)  # re-rank rows are float16


def test_incremental_add_to_a_reranked_index_extends_the_float16_file(tmp_path):
    first, second = clustered(3000, DIM, seed=1), clustered(1000, DIM, seed=1, fresh=2)
    write_shard(tmp_path, "00000", first)
    old = build_index(str(tmp_path), RERANKED, tune_queries=100)
    write_shard(tmp_path, "00001", second)
    meta = update_index(str(tmp_path))
    assert meta["update"]["mode"] == "added" and meta["count"] == 4000
    assert meta["files"]["vectors"] != old["files"]["vectors"]
    assert not (tmp_path / "index" / old["files"]["vectors"]).exists()  # the previous build's files are gone
    index, ids, _ = load_index(str(tmp_path))
    assert index.ntotal == ids.num_rows == 4000
    assert index.k_factor == old["tuning"]["params"]["k_factor_rf"]  # tuned parameters survive the update
    queries = clustered(40, DIM, seed=1, fresh=3)
    assert np.array_equal(_search_everything(index, queries), _exact_top10(queries, np.concatenate([first, second])))


def test_attach_refuses_vectors_of_another_size(tmp_path):
    write_shard(tmp_path, "00000", clustered(500, DIM))
    build_index(str(tmp_path), "IVF4,PQ8x4fs,Refine(SQfp16)", tune_queries=20)
    index, _, _ = load_index(str(tmp_path))
    base, _ = detach(index)
    short = str(tmp_path / "short.faiss")
    create(short, DIM, 499)
    with pytest.raises(Exception, match="do not match"):
        attach(base, open_vectors(short))


def test_a_failed_build_leaves_the_previous_index_serving(tmp_path, monkeypatch):
    write_shard(tmp_path, "00000", clustered(2000, DIM))
    before = build_index(str(tmp_path), RERANKED, tune_queries=50)
    searcher = Searcher(str(tmp_path))
    q = clustered(1, DIM, seed=4)[0]
    answer = [h.key for h in searcher.search(vector=q, k=5)]
    write_shard(tmp_path, "00001", clustered(2000, DIM, seed=2))

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-add")

    monkeypatch.setattr(build_module, "iter_vectors", broken)
    with pytest.raises(RuntimeError, match="killed mid-add"):
        build_index(str(tmp_path), RERANKED, tune_queries=50)
    assert read_meta(str(tmp_path)) == before  # still the previous build, whole
    assert not [p for p in os.listdir(tmp_path / "index") if p.endswith(".tmp")]
    assert [h.key for h in searcher.search(vector=q, k=5)] == answer
    assert [h.key for h in Searcher(str(tmp_path)).search(vector=q, k=5)] == answer


# --- parts: merged on disk, incremental, memory-mapped -------------------------------------------------------

MERGED_ON_DISK = ["IVF16,SQ8", "IVF16,Flat,Refine(SQfp16)"]
PARTS_FACTORIES = [*MERGED_ON_DISK, "IVF16,PQ8x4fs,Refine(SQfp16)"]  # fast-scan lists merge in RAM


def _write_parts(out, shards: int = 4, rows: int = 1000, first_seed: int = 0) -> np.ndarray:
    vectors = [clustered(rows, DIM, seed=first_seed + i) for i in range(shards)]
    for i, x in enumerate(vectors):
        write_shard(out, f"{first_seed + i:05d}", x)
    return np.concatenate(vectors)


def _answers(out, queries: np.ndarray, k_factor: float = 8) -> np.ndarray:
    index, _, _ = load_index(str(out), mmap=True)
    if hasattr(index, "k_factor"):
        index.k_factor = k_factor  # the tuned depth depends on measured speed: compare at the same one
    return index.search(queries, 10)[1]


@pytest.mark.parametrize("factory", PARTS_FACTORIES)
def test_index_built_in_parts_answers_exactly_as_one_built_in_one_process(tmp_path, factory):
    one, parted = tmp_path / "one", tmp_path / "parts"
    for out in (one, parted):
        _write_parts(out)
    build_index(str(one), factory, nprobe=16, tune_queries=50)
    meta = build_in_parts(str(parted), BuildSpec(factory, nprobe=16, tune_queries=50), part_rows=1500)
    assert meta["parts"]["count"] == 2 and meta["count"] == 4000  # 1,000-row files grouped until ≥ 1,500 rows
    assert meta["parts"]["merged"] == ("on disk" if factory in MERGED_ON_DISK else "in RAM")
    assert ("lists" in meta["files"]) == (factory in MERGED_ON_DISK) and "trained" in meta["files"]
    assert sorted(os.listdir(parted / "index")) == sorted([*meta["files"].values(), "meta.json"])  # no leftovers
    queries = clustered(30, DIM, seed=9)
    assert np.array_equal(_answers(one, queries), _answers(parted, queries))
    assert load_index(str(one))[1].equals(load_index(str(parted))[1])  # the same id map
    if "lists" in meta["files"]:
        index, _, _ = load_index(str(parted), mmap=True)
        assert _mapped(parted / "index" / meta["files"]["lists"])  # the merged lists are read in place


@pytest.mark.parametrize("factory", PARTS_FACTORIES)
def test_incremental_add_through_parts_matches_adding_in_one_process(tmp_path, factory):
    one, parted = tmp_path / "one", tmp_path / "parts"
    for out in (one, parted):
        _write_parts(out, shards=3)
    build_index(str(one), factory, nprobe=16, tune_queries=50)
    before = build_in_parts(str(parted), BuildSpec(factory, nprobe=16, tune_queries=50), part_rows=1500)
    for out in (one, parted):
        _write_parts(out, shards=2, rows=600, first_seed=3)
    update_index(str(one))
    meta = update_index(str(parted), part_rows=500)
    assert meta["update"]["mode"] == "added" and meta["count"] == 4200 and "trained" in meta["files"]
    files = set(os.listdir(parted / "index"))
    assert files == {*meta["files"].values(), "meta.json"} and not files & set(before["files"].values())
    queries = clustered(30, DIM, seed=9)
    assert np.array_equal(_answers(one, queries), _answers(parted, queries))
    assert load_index(str(one))[1].equals(load_index(str(parted))[1])


def test_the_sample_pass_picks_the_same_rows_in_any_number_of_groups(tmp_path):
    sizes = [700, 1, 1300, 450, 999]
    x = np.concatenate([clustered(n, DIM, seed=i) for i, n in enumerate(sizes)])
    first = 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path, f"{i:05d}", x[first: first + n])
        first += n
    files = index_files(str(tmp_path))
    calls = []

    def elsewhere(fn, jobs):
        calls.append(len(jobs))
        return [fn(*job) for job in reversed(jobs)][::-1]  # run out of order, returned in order

    train, queries, query_ids = sample(files, 300, 40, seed=5)
    assert np.array_equal(queries, x[query_ids]) and len(train) == 300
    assert np.array_equal(train, x[np.arange(0, len(x), len(x) // 300)[:300]])  # spread evenly over all rows
    for groups in (2, 3, 5, 9):
        got = sample(files, 300, 40, seed=5, map_groups=elsewhere, groups=groups)
        assert all(np.array_equal(a, b) for a, b in zip(got, (train, queries, query_ids))), groups
    assert calls[:2] == [2, 3] and max(calls) <= len(files)  # groups balanced by rows, never more than files


@pytest.mark.parametrize("lists", [1, 4])
def test_fast_scan_lists_merge_exactly_across_block_boundaries(lists):
    # FAISS 1.15's own merge_from overruns a list that already holds a positive multiple of block_size entries
    # (here 128: 32 codes of 4 bytes a block); these part sizes put lists on and across that boundary.
    x = clustered(2000, DIM, seed=3)
    trained = faiss.index_factory(DIM, f"IVF{lists},PQ8x4fs", faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    sizes, parts, first = [128 * lists, 100, 256 * lists, 0, 37, 1], [], 0
    for size in sizes:
        part = faiss.clone_index(trained)
        part.add_with_ids(x[first: first + size], np.arange(first, first + size))
        parts.append(part)
        first += size
    whole = faiss.clone_index(trained)
    whole.add_with_ids(x[:first], np.arange(first))
    merged = faiss.clone_index(trained)
    merge_block_lists(merged, iter(parts))
    assert merged.ntotal == first
    for index in (merged, whole):
        faiss.extract_index_ivf(index).nprobe = lists
    queries = clustered(20, DIM, seed=4)
    got, want = merged.search(queries, 50), whole.search(queries, 50)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    with pytest.raises(IndexStateError, match="empty index"):
        merge_block_lists(merged, iter(parts))


def test_memory_mapped_open_leaves_the_lists_on_disk_and_answers_the_same(tmp_path):
    _write_parts(tmp_path, shards=2)
    meta = build_index(str(tmp_path), "IVF16,SQ8", nprobe=4, tune_queries=50)
    queries = clustered(20, DIM, seed=5)
    in_ram, _, _ = load_index(str(tmp_path))
    mapped, _, _ = load_index(str(tmp_path), mmap=True)
    assert _mapped(tmp_path / "index" / meta["files"]["index"])
    assert np.array_equal(in_ram.search(queries, 10)[1], mapped.search(queries, 10)[1])
    searcher = Searcher(str(tmp_path))  # serving opens it memory-mapped
    assert [h.id for h in searcher.search(vector=queries[0], k=10)] == in_ram.search(queries[:1], 10)[1][0].tolist()
    assert searcher.search(vector=queries[0], k=5, label="red circle")  # filtered search over mapped lists


def test_a_failed_part_leaves_the_previous_index_serving(tmp_path):
    _write_parts(tmp_path, shards=3)
    spec = BuildSpec("IVF16,SQ8", nprobe=16, tune_queries=50)
    before = build_in_parts(str(tmp_path), spec, part_rows=1000)
    searcher = Searcher(str(tmp_path))
    q = clustered(1, DIM, seed=4)[0]
    answer = [h.key for h in searcher.search(vector=q, k=5)]

    def failing(job, numbers):
        add_part(job, numbers[0])
        raise RuntimeError("part 1 failed")

    with pytest.raises(RuntimeError, match="part 1 failed"):
        build_in_parts(str(tmp_path), spec, part_rows=1000, runner=failing)
    assert read_meta(str(tmp_path)) == before
    assert sorted(os.listdir(tmp_path / "index")) == sorted([*before["files"].values(), "meta.json"])
    assert [h.key for h in searcher.search(vector=q, k=5)] == answer
    assert [h.key for h in Searcher(str(tmp_path)).search(vector=q, k=5)] == answer


KILLED_BUILD = """
import sys, time
from index.build import BuildSpec
from index.parts import add_part, build_in_parts

def slow(job, numbers):
    add_part(job, numbers[0])
    print("part added", flush=True)
    time.sleep(600)

build_in_parts(sys.argv[1], BuildSpec("IVF16,SQ8", nprobe=16, tune_queries=50), part_rows=1000, runner=slow)
"""


@pytest.mark.timeout(120)
def test_a_killed_build_leaves_the_previous_index_serving_and_only_temporary_files(tmp_path):
    import signal
    import subprocess
    import sys

    from shardlight.core.layout import remove_temporary

    _write_parts(tmp_path, shards=3)
    before = build_in_parts(str(tmp_path), BuildSpec("IVF16,SQ8", nprobe=16, tune_queries=50), part_rows=1000)
    q = clustered(1, DIM, seed=4)[0]
    answer = [h.key for h in Searcher(str(tmp_path)).search(vector=q, k=5)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "part added"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert read_meta(str(tmp_path)) == before
    assert [h.key for h in Searcher(str(tmp_path)).search(vector=q, k=5)] == answer
    leftovers = set(os.listdir(tmp_path / "index")) - {*before["files"].values(), "meta.json"}
    assert leftovers and all(name.startswith(".parts.") and name.endswith(".tmp") for name in leftovers)
    assert remove_temporary(str(tmp_path))  # the next run clears them
    assert sorted(os.listdir(tmp_path / "index")) == sorted([*before["files"].values(), "meta.json"])
