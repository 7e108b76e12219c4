"""The real thing: the Prefect flow on a local Ray (2 CPUs) over tiny shards with planted damage."""

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from flows.pipeline import pipeline
from index.build import load_index
from index.search import Searcher
from shardlight.core.config import CONFIG_DIR, load_config
from shardlight.core.storage import list_shards
from tests.conftest import DAMAGED_DROPPED, DAMAGED_KEYS, tar_keys
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
    worker = summary["worker"]  # the demo's one actor holds both CPUs of its local Ray and uses them
    assert worker["cpus"] == 2 and worker["threads"] == 2
    # the demo models are small fp32 ones: both cores decode a batch while the model waits (workers/decoders.py)
    assert worker["decode_schedule"] == "between" and worker["decode_workers"] == 2
    assert worker["nice"] == 0  # not Ray's default 15, below every other process on the node
    assert worker["malloc_kept"]  # its batches reuse freed pages (workers/memory.py)
    assert summary["worker_startup_s"] > 0  # reported beside the rate, which counts from the workers being up
    for shard in ("00000", "00001", "00002", "00003"):
        rows = pq.read_table(f"{out}/embeddings/{shard}.parquet").num_rows
        dropped = sum(e["dropped"] for e in pq.read_table(f"{out}/errors/{shard}.parquet").to_pylist())
        read = len(tar_keys(f"{cfg.input}/{shard}.tar"))  # tarfile's count, not the pipeline's reader
        assert (read, dropped) == (DAMAGED_KEYS[shard], DAMAGED_DROPPED[shard]), shard
        assert rows + dropped == read, shard
    assert summary["samples_read"] == sum(DAMAGED_KEYS.values()) == 18
    assert summary["rows"] == 18 - sum(DAMAGED_DROPPED.values()) == 16


def test_damage_is_recorded(first_run):
    cfg, summary = first_run
    errors = pq.read_table(f"{cfg.output}/errors/00001.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("b0001", "decode")]
    rows = {r["key"]: r for r in pq.read_table(f"{cfg.output}/embeddings/00001.parquet").to_pylist()}
    assert "b0001" not in rows and rows["b0002"]["caption"] is None and rows["b0002"]["text_embedding"] is None
    assert summary["shard_problems"]["00002"] == "empty shard (no tar members)"
    assert summary["shard_problems"]["00003"].startswith("truncated shard")
    cut = pq.read_table(f"{cfg.output}/errors/00003.parquet").to_pylist()
    assert [(e["key"], e["stage"], e["dropped"]) for e in cut] == [("c0005", "read", True), (None, "shard", False)]


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


def json_labels(input_dir) -> dict[str, str]:
    """Ground truth: each input sample's label from its own json member, read with tarfile alone."""
    labels = {}
    for tar_path in sorted(Path(input_dir).glob("*.tar")):
        try:
            with tarfile.open(tar_path, "r|*") as tar:
                for info in tar:
                    if info.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(info).read())
                        if "label" in meta:
                            labels[info.name.rsplit(".", 1)[0]] = meta["label"]
        except (tarfile.TarError, OSError):
            pass  # the empty and the truncated shard: what was read is enough
    return labels


@pytest.mark.timeout(300)
def test_text_query_finds_the_red_circles_via_searcher_and_http(first_run):
    """Through the pipeline (configs/demo.yaml): "a red circle" ranks exactly the input rows whose own json
    says red circle first, in Python and over HTTP."""
    from index.service.http_common import ServerSettings
    from index.service.server import create_app
    from tests.index_helpers import running_server

    cfg, _ = first_run
    truth = json_labels(cfg.input)
    indexed = set(pq.read_table(f"{cfg.output}/embeddings").column("key").to_pylist())
    red_circles = sorted(k for k, label in truth.items() if label == "red circle" and k in indexed)
    assert len(red_circles) == 3  # 000000003, b0000 and c0000 (label ids cycle through the 24 classes)
    searcher = Searcher(cfg.output)
    hits = searcher.search(text="a red circle", k=3, synthetic=False)
    assert sorted(h.key for h in hits) == red_circles
    with running_server(create_app(cfg.output, ServerSettings(), searcher, warm=False)) as url:
        r = requests.get(f"{url}/search", params={"text": "a red circle", "k": 3, "synthetic": "false"}, timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(h["key"] for h in r.json()["results"]) == red_circles


def test_second_run_does_no_work(first_run):
    cfg, first = first_run
    assert not list(Path(cfg.output).rglob(".*.tmp"))  # every write of the first run was renamed
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.output).rglob("*.parquet")}
    stale = Path(cfg.output) / "embeddings" / ".00001.parquet.0badf00d.tmp"  # as a killed write leaves it
    stale.write_bytes(b"half a parquet file")
    again = pipeline(cfg.model_dump())
    assert not stale.exists() and not list(Path(cfg.output).rglob(".*.tmp"))
    assert again["processed"] == 0 and again["skipped"] == 4 and again["augment"]["processed"] == 0
    assert again["rows"] == first["rows"] and again["index"]["update"] == "unchanged"
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.output).rglob("*.parquet")}
    assert before == after


def test_embedding_rate_counts_only_the_embedding_share_of_the_stage(tmp_path):
    """Embedding and augmentation share the actors: images/s credits embedding with its share of the wall time."""
    from flows.pipeline import summarize
    from shardlight.core.config import RunConfig

    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    embedded = {"stats": [{"rows": 100, "seconds": 3.0}], "failed": {}, "worker": {}, "seconds": 8.0, "startup_s": 2.0}
    augmented = {"stats": [{"rows": 10, "seconds": 1.0}], "failed": {}}
    summary = summarize(cfg, {"shards": [], "todo": []}, embedded, None, augmented)
    assert summary["new_rows"] == 100 and summary["images_per_s"] == round(100 / (8.0 * 3 / 4), 2)
    alone = summarize(cfg, {"shards": [], "todo": []}, embedded, None, {"stats": [], "failed": {}})
    assert alone["images_per_s"] == round(100 / 8.0, 2)


def test_progress_bar_and_summary_show_one_images_per_s_and_zero_for_nothing_to_do(tmp_path):
    """The bar's img_s after the last shard is the summary's images_per_s (one definition, counted from the
    workers being up: their start-up is reported on its own); no work: 0.0."""
    from unittest import mock

    from flows.pipeline import _ShardProgress, summarize
    from shardlight.core.config import RunConfig

    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    with mock.patch("flows.pipeline.time.perf_counter", side_effect=[100.0, 102.0, 108.0]):
        bar = _ShardProgress("embedding + augmenting", 1)
        bar.workers_up()
        bar({"embed": {"rows": 100, "seconds": 3.0}, "augment": {"generated": 10, "seconds": 1.0}})
        shown = bar.bar.postfix
        bar.close()
    embedded = {"stats": [{"rows": 100, "seconds": 3.0}], "failed": {}, "worker": {}, "seconds": 6.0, "startup_s": 2.0}
    summary = summarize(cfg, {"shards": [], "todo": []}, embedded, None,
                        {"stats": [{"rows": 10, "seconds": 1.0}], "failed": {}})
    assert f"img_s={summary['images_per_s']:.2f}" in shown and summary["images_per_s"] == round(100 / 4.5, 2)
    assert summary["worker_startup_s"] == 2.0
    idle = summarize(cfg, {"shards": [], "todo": []},
                     {"stats": [], "failed": {}, "worker": {}, "seconds": 0.0, "startup_s": 0.0}, None,
                     {"stats": [], "failed": {}})
    assert idle["images_per_s"] == 0.0
