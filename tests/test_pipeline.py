"""The real thing: the Prefect flow on a local Ray (2 CPUs) over tiny shards with planted damage."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.pipeline import pipeline
from index.build import load_index
from index.search import Searcher
from shardlight.core.config import CONFIG_DIR, load_config
from shardlight.core.storage import list_shards
from workers.reader import ShardReader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _config(data, out):
    return load_config(CONFIG_DIR / "demo.yaml", input=str(data), output=str(out))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_server):
    from tests.conftest import write_damaged_shards

    root = tmp_path_factory.mktemp("pipe")
    data = write_damaged_shards(root, seed=21)["dir"]
    cfg = _config(data, root / "out")
    return cfg, pipeline(cfg.model_dump())


def test_one_parquet_per_shard_and_counts_reconcile(first_run):
    cfg, summary = first_run
    out = cfg.output
    assert summary["shards"] == 4 and summary["processed"] == 4 and not summary["failed"]
    total_rows, total_dropped = 0, 0
    for shard in ("00000", "00001", "00002", "00003"):
        rows = pq.read_table(f"{out}/embeddings/{shard}.parquet").num_rows
        errors = pq.read_table(f"{out}/errors/{shard}.parquet").to_pylist()
        total_rows += rows
        total_dropped += sum(e["dropped"] for e in errors)
    assert total_rows == summary["rows"]
    assert total_rows + total_dropped == summary["samples_read"]
    # samples read = what an independent reader of the same shards sees
    independent = sum(len(list(ShardReader(s))) for s in list_shards(cfg.input))
    assert summary["samples_read"] == independent


def test_damage_is_recorded(first_run):
    cfg, summary = first_run
    errors = pq.read_table(f"{cfg.output}/errors/00001.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("b0001", "decode")]
    rows = {r["key"]: r for r in pq.read_table(f"{cfg.output}/embeddings/00001.parquet").to_pylist()}
    assert "b0001" not in rows and rows["b0002"]["caption"] is None and rows["b0002"]["text_embedding"] is None
    assert summary["shard_problems"]["00002"] == "empty shard (no tar members)"
    assert summary["shard_problems"]["00003"].startswith("truncated shard")


def test_index_and_run_record(first_run):
    cfg, summary = first_run
    index, ids, meta = load_index(cfg.output)
    # configs/demo.yaml also runs the DiT augmentation stage: its rows are indexed after the input rows
    synthetic = summary["augment"]["rows"]
    assert synthetic > 0 and index.ntotal == summary["rows"] + synthetic == meta["count"] == summary["index"]["count"]
    record = json.loads(open(f"{cfg.output}/run.json").read())
    assert record["config"]["clip"]["model"] == "shapes-clip"
    assert {"torch", "open_clip_torch", "faiss-cpu", "ray", "prefect"} <= set(record["versions"])
    assert record["summary"]["rows"] == summary["rows"]


def test_query_with_a_samples_own_image_returns_it_first(first_run):
    cfg, _ = first_run
    searcher = Searcher(cfg.output)
    for raw in list(ShardReader(list_shards(cfg.input)[0]))[:3]:
        hits = searcher.search(image=raw.image, k=3)
        assert hits[0].key == raw.key


def test_second_run_does_no_work(first_run):
    cfg, first = first_run
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.output).rglob("*.parquet")}
    again = pipeline(cfg.model_dump())
    assert again["processed"] == 0 and again["skipped"] == 4 and again["augment"]["processed"] == 0
    assert again["rows"] == first["rows"] and again["index"]["update"] == "unchanged"
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.output).rglob("*.parquet")}
    assert before == after


def test_embedding_rate_counts_only_the_embedding_share_of_the_stage(tmp_path):
    """Embedding and augmentation share the actors: images/s credits embedding with its share of the wall time."""
    from flows.pipeline import summarize
    from shardlight.core.config import RunConfig

    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    embedded = {"stats": [{"rows": 100, "seconds": 3.0}], "failed": {}, "worker": {}, "seconds": 8.0}
    augmented = {"stats": [{"rows": 10, "seconds": 1.0}], "failed": {}}
    summary = summarize(cfg, {"shards": [], "todo": []}, embedded, None, augmented)
    assert summary["new_rows"] == 100 and summary["images_per_s"] == round(100 / (8.0 * 3 / 4), 2)
    alone = summarize(cfg, {"shards": [], "todo": []}, embedded, None, {"stats": [], "failed": {}})
    assert alone["images_per_s"] == round(100 / 8.0, 2)


def test_progress_bar_and_summary_show_one_images_per_s_and_zero_for_nothing_to_do(tmp_path):
    """The bar's img_s after the last shard is the summary's images_per_s (one definition); no work: 0.0."""
    from unittest import mock

    from flows.pipeline import _ShardProgress, summarize
    from shardlight.core.config import RunConfig

    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    with mock.patch("flows.pipeline.time.perf_counter", return_value=108.0):
        bar = _ShardProgress("embedding + augmenting", 1, start=100.0)
        bar({"embed": {"rows": 100, "seconds": 3.0}, "augment": {"generated": 10, "seconds": 1.0}})
        shown = bar.bar.postfix
        bar.close()
    embedded = {"stats": [{"rows": 100, "seconds": 3.0}], "failed": {}, "worker": {}, "seconds": 8.0}
    summary = summarize(cfg, {"shards": [], "todo": []}, embedded, None,
                        {"stats": [{"rows": 10, "seconds": 1.0}], "failed": {}})
    assert f"img_s={summary['images_per_s']:.2f}" in shown
    idle = summarize(cfg, {"shards": [], "todo": []}, {"stats": [], "failed": {}, "worker": {}, "seconds": 0.0}, None,
                     {"stats": [], "failed": {}})
    assert idle["images_per_s"] == 0.0
