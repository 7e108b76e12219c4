"""DiT augmentations through the real flow: Prefect, local Ray, the shipped demo DiT, Parquet, the FAISS index."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.pipeline import pipeline
from index.build import load_index
from index.search import Searcher
from shardlight.core.config import CONFIG_DIR, load_config
from shardlight.core.layout import augmented_path
from shardlight.core.schema import CORE_COLUMNS
from shardlight.training.synthetic import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLASSES = ["red circle", "blue square"]
PER_SHARD = {"generate": len(CLASSES), "vary": 2 * 2}
JSON_FIELDS = {"source_key", "target_label", "mode", "seed", "steps", "guidance", "strength"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("augflow")
    write_shards(root / "data", 2, 12, seed=3)
    cfg = load_config(CONFIG_DIR / "demo.yaml", input=str(root / "data"), output=str(root / "out"))
    assert cfg.augment.enabled, "configs/demo.yaml runs the augmentation stage"
    config = cfg.model_dump()
    config["augment"].update(classes=CLASSES, generate_per_class=1, vary_sources=2, vary_per_source=2, steps=4)
    return config, pipeline(config)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_summary_counts_every_generated_image(run):
    _, summary = run
    aug = summary["augment"]
    assert aug["shards"] == 2 and aug["processed"] == 2 and not aug["failed"]
    assert aug["by_mode"] == {mode: 2 * n for mode, n in PER_SHARD.items()}
    assert aug["generated"] == 2 * sum(PER_SHARD.values()) == aug["rows"] + aug["dropped_low_clip"]


def test_shards_and_parquet_rows_describe_each_image(run):
    config, _ = run
    out = Path(config["output"])
    for shard in ("00000", "00001"):
        members = _members(augmented_path(str(out), shard, "tar"))
        rows = pq.read_table(out / "augmented" / f"{shard}.parquet").to_pylist()
        sources = set(pq.read_table(out / "embeddings" / f"{shard}.parquet")["key"].to_pylist())
        assert len(rows) == sum(PER_SHARD.values()) and set(CORE_COLUMNS) <= set(rows[0])
        assert set(members) == {f"{r['key']}.{ext}" for r in rows for ext in ("png", "json")}
        for row in rows:
            meta = json.loads(members[f"{row['key']}.json"])
            assert JSON_FIELDS <= set(meta) and row["synthetic"] is True
            assert meta["target_label"] == row["target_label"] and meta["source_key"] == row["source_key"]
            assert row["label"] is not None  # what the ViT sees in the generated image
            with Image.open(io.BytesIO(members[f"{row['key']}.png"])) as image:
                assert image.size == (64, 64)
            if meta["mode"] == "generate":
                assert row["source_key"] is None and row["target_label"] in CLASSES
            else:
                assert row["source_key"] in sources and meta["strength"] == config["augment"]["strength"]


def test_each_shard_generates_its_own_images(run):
    config, _ = run
    pngs = [{name.split("_", 1)[1]: data for name, data in _members(augmented_path(config["output"], shard, "tar")).items()
             if "_gen_" in name and name.endswith(".png")} for shard in ("00000", "00001")]
    assert pngs[0].keys() == pngs[1].keys() and len(pngs[0]) == len(CLASSES)  # same classes, same indices...
    assert all(pngs[0][name] != pngs[1][name] for name in pngs[0])  # ...but other seeds, so other images


def test_index_holds_real_and_generated_rows_and_filters_them(run):
    config, summary = run
    index, _, _ = load_index(config["output"])
    assert index.ntotal == summary["rows"] + summary["augment"]["rows"] == summary["index"]["count"]
    searcher = Searcher(config["output"])
    generated = searcher.search(text="a red circle", k=5, synthetic=True)
    assert generated and all(h.synthetic for h in generated)
    assert not any(h.synthetic for h in searcher.search(text="a red circle", k=5, synthetic=False))


def test_rerun_regenerates_a_lost_shard_identically(run):
    config, first = run
    rows, tar = (Path(augmented_path(config["output"], "00001", ext)) for ext in ("parquet", "tar"))
    before = {p: p.read_bytes() for p in (rows, tar)}
    table_before = pq.read_table(rows)
    for path in before:
        path.unlink()
    again = pipeline(config)
    assert again["processed"] == 0 and again["augment"]["processed"] == 1
    assert tar.read_bytes() == before[tar]  # same seeds, same pixels, same bytes
    assert pq.read_table(rows).equals(table_before)
    assert again["augment"]["rows"] == first["augment"]["rows"]
