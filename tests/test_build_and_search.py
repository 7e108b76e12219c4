"""FAISS index build from real Parquet outputs and the Searcher on top of it."""

import json

import numpy as np
import pytest

from index.build import build_index, load_index, read_meta
from index.search import Searcher
from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec
from shardlight.core.errors import IndexStateError, InputError
from shardlight.core.layout import run_record_path
from shardlight.core.storage import write_atomic
from shardlight.training.synthetic import write_shards
from workers.embed import ShardEmbedder


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Two embedded shards plus the run record a Searcher needs."""
    root = tmp_path_factory.mktemp("idx")
    shards = write_shards(root / "data", shards=2, samples_per_shard=12, seed=11)
    clip = ClipSpec(model="shapes-clip")
    embedder = ShardEmbedder(clip, LabelSpec(kind="none"), ComputeSpec(batch_size=8))
    out = str(root / "out")
    for shard in shards:
        embedder.process(str(shard), out)
    write_atomic(run_record_path(out), json.dumps({"config": {"clip": clip.model_dump()}}).encode())
    return out


def test_flat_index_counts_and_id_map(out):
    meta = build_index(out, "Flat", model={"model": "shapes-clip"})
    index, ids, loaded = load_index(out)
    assert meta == loaded and index.ntotal == meta["count"] == 24 == ids.num_rows
    assert ids.column("shard").to_pylist() == ["00000"] * 12 + ["00001"] * 12
    assert ids.column("row").to_pylist() == list(range(12)) * 2
    for key in ("model", "dim", "count", "factory", "created_at", "fingerprint"):
        assert key in meta


def test_rebuild_replaces_files_and_keeps_one_build(out, tmp_path):
    first = build_index(out, "Flat")
    second = build_index(out, "HNSW16")
    assert second["factory"] == "HNSW16" and second["count"] == first["count"]
    from pathlib import Path

    files = sorted(p.name for p in (Path(out) / "index").iterdir())
    assert files == sorted(["meta.json", *second["files"].values()])


def test_trained_factory_builds(out):
    meta = build_index(out, "IVF4,Flat", train_sample=24, nprobe=4)
    assert meta["count"] == 24 and read_meta(out)["nprobe"] == 4


def test_bad_factory_and_missing_index(out, tmp_path):
    with pytest.raises(IndexStateError, match="bad FAISS factory string"):
        build_index(out, "NotAnIndex")
    with pytest.raises(IndexStateError, match="no index at"):
        load_index(str(tmp_path))


def test_search_by_key_vector_and_text(out):
    build_index(out, "Flat")
    searcher = Searcher(out)
    key = searcher.keys[5]
    hits = searcher.search(key=key, k=3)
    assert hits[0].key == key and hits[0].score == pytest.approx(1.0, abs=1e-4)
    vec = searcher.vector_of_key(searcher.keys[7])
    assert searcher.search(vector=vec * 3.0, k=1)[0].key == searcher.keys[7]  # queries are normalised
    text_hits = searcher.search(text="a red circle", k=4)
    assert len(text_hits) == 4 and all(h.caption for h in text_hits)
    assert [h.score for h in text_hits] == sorted((h.score for h in text_hits), reverse=True)


def test_search_argument_errors(out):
    build_index(out, "Flat")
    searcher = Searcher(out)
    with pytest.raises(InputError, match="exactly one"):
        searcher.search(text="a", key="b")
    with pytest.raises(InputError, match="dimensions"):
        searcher.search(vector=np.ones(3))
    with pytest.raises(InputError, match="no sample with key"):
        searcher.search(key="missing")
