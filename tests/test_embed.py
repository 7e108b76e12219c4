"""The worker on its own (no Ray): outputs, schema, reconciliation of rows and errors."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec
from shardlight.core.layout import read_stats, shard_done
from tests.conftest import make_samples, tar_keys, write_tar
from workers.embed import ShardEmbedder


@pytest.fixture(scope="module")
def embedder():
    return ShardEmbedder(ClipSpec(model="shapes-clip"), LabelSpec(kind="vit", model="shapes-vit", top_k=3),
                         ComputeSpec(batch_size=4))


def test_rows_and_errors_reconcile_on_a_damaged_shard(embedder, damaged_shards, tmp_path):
    out = str(tmp_path / "out")
    stats = embedder.process(str(damaged_shards["dir"] / "00001.tar"), out)
    table = pq.read_table(f"{out}/embeddings/00001.parquet")
    errors = pq.read_table(f"{out}/errors/00001.parquet").to_pylist()
    assert stats["samples_read"] == len(tar_keys(damaged_shards["dir"] / "00001.tar")) == 6
    assert stats["rows"] == 5 and stats["errors"] == 1
    assert table.num_rows + sum(e["dropped"] for e in errors) == stats["samples_read"]
    assert [e["key"] for e in errors if e["dropped"]] == [damaged_shards["corrupt_key"]]
    row = table.to_pylist()[table.column("key").to_pylist().index(damaged_shards["no_caption_key"])]
    assert row["caption"] is None and row["text_embedding"] is None and row["clip_score"] is None
    assert row["url"] == "http://example.com/b0002.jpg"
    assert read_stats(f"{out}/embeddings/00001.parquet") == stats
    assert shard_done(out, str(damaged_shards["dir"] / "00001.tar"))


def test_schema_and_normalised_vectors(embedder, damaged_shards, tmp_path):
    out = str(tmp_path / "out")
    embedder.process(str(damaged_shards["dir"] / "00000.tar"), out)
    table = pq.read_table(f"{out}/embeddings/00000.parquet")
    for col in ("key", "shard", "caption", "url", "width", "height", "image_embedding", "text_embedding",
                "clip_score", "label_id", "label", "label_prob", "topk_ids", "topk_probs", "shape", "color"):
        assert col in table.column_names
    assert table.column("json_label").to_pylist()[0]  # the json's own label kept beside the ViT's
    assert table.schema.field("image_embedding").type.list_size == embedder.clip.dim
    img = np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False))
    txt = np.stack(table.column("text_embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(table.column("clip_score").to_numpy(), (img * txt).sum(1), atol=1e-5)
    assert all(len(ids) == 3 for ids in table.column("topk_ids").to_pylist())
    assert table.column("width").to_pylist() == [64] * table.num_rows


def test_empty_and_truncated_shards_still_write_outputs(embedder, damaged_shards, tmp_path):
    out = str(tmp_path / "out")
    empty = embedder.process(str(damaged_shards["dir"] / "00002.tar"), out)
    assert empty["rows"] == 0 and empty["problem"] == "empty shard (no tar members)"
    assert pq.read_table(f"{out}/embeddings/00002.parquet").num_rows == 0
    cut_url = str(damaged_shards["dir"] / "00003.tar")
    cut = embedder.process(cut_url, out)
    keys = tar_keys(cut_url)  # c0000..c0005: c0005.jpg's header survived the cut, its data did not
    assert cut["problem"].startswith("truncated shard") and cut["samples_read"] == len(keys) == 6
    assert (cut["rows"], cut["errors"]) == (5, 1)
    rows = pq.read_table(f"{out}/embeddings/00003.parquet").column("key").to_pylist()
    errors = pq.read_table(f"{out}/errors/00003.parquet").to_pylist()
    assert rows == keys[:5]
    assert [(e["key"], e["stage"], e["dropped"]) for e in errors] == [("c0005", "read", True), (None, "shard", False)]


def test_same_shard_gives_identical_output(embedder, damaged_shards, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    embedder.process(str(damaged_shards["dir"] / "00000.tar"), a)
    embedder.process(str(damaged_shards["dir"] / "00000.tar"), b)
    ta, tb = pq.read_table(f"{a}/embeddings/00000.parquet"), pq.read_table(f"{b}/embeddings/00000.parquet")
    assert ta.drop_columns([]).equals(tb)


def test_captions_embedded_across_batches_give_each_row_its_own_vector(embedder, tmp_path):
    """Captions wait for a window of batches and run sorted by length; every row still gets open_clip's own
    vector for its caption (77 padded tokens), in shard order, whether the window spans one batch or many."""
    import torch

    words = "a small red circle on a plain white ground beside a blue square".split()
    samples = make_samples(13, seed=11, prefix="m")
    for i, sample in enumerate(samples):
        sample["txt"] = " ".join(words[: 1 + (i * 5) % len(words)] * (30 if i == 7 else 1)).encode()  # 7: > context
    for i in (4, 9):  # no caption at all: neither a txt nor one in the json
        del samples[i]["txt"]
        samples[i]["json"] = b'{"status": "success"}'
    shard = str(write_tar(tmp_path / "00000.tar", samples))
    tables = {}
    window = embedder.text_window
    try:
        for embedder.text_window in (1, 6, 1000):  # each batch alone; two batches a window; the whole shard
            out = str(tmp_path / f"w{embedder.text_window}")
            embedder.process(shard, out)
            tables[embedder.text_window] = pq.read_table(f"{out}/embeddings/00000.parquet").to_pylist()
    finally:
        embedder.text_window = window
    clip = embedder.clip
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(
            [s["txt"].decode() for s in samples if "txt" in s])), dim=-1).numpy()
    for rows in tables.values():
        assert [r["key"] for r in rows] == [s["__key__"] for s in samples]
        with_text = [r for r in rows if r["caption"] is not None]
        assert [r["key"] for r in rows if r["text_embedding"] is None] == ["m0004", "m0009"]
        np.testing.assert_allclose(np.array([r["text_embedding"] for r in with_text]), expected, atol=1e-5)
        np.testing.assert_allclose([r["clip_score"] for r in with_text],
                                   [np.dot(r["image_embedding"], r["text_embedding"]) for r in with_text], atol=1e-5)
        assert [r["image_embedding"] for r in rows] == [r["image_embedding"] for r in tables[1]]
        assert [r["label_id"] for r in rows] == [r["label_id"] for r in tables[1]]


def test_zero_shot_labels_come_from_the_class_list(damaged_shards, tmp_path):
    names = ["red circle", "blue square", "green star"]
    embedder = ShardEmbedder(ClipSpec(model="shapes-clip"),
                             LabelSpec(kind="zeroshot", class_names=names, prompt="a {}", top_k=2),
                             ComputeSpec(batch_size=4))
    stats = embedder.process(str(damaged_shards["dir"] / "00000.tar"), str(tmp_path))
    table = pq.read_table(f"{tmp_path}/embeddings/00000.parquet")
    assert stats["rows"] == 6
    assert set(table.column("label").to_pylist()) <= set(names)
    probs = table.column("topk_probs").to_pylist()
    assert all(len(p) == 2 and p[0] >= p[1] for p in probs)
    ids = table.column("label_id").to_pylist()
    assert [names[i] for i in ids] == table.column("label").to_pylist()


def test_zero_shot_without_class_names_is_a_clear_error():
    from shardlight.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="needs labels.class_names"):
        ShardEmbedder(ClipSpec(model="shapes-clip"), LabelSpec(kind="zeroshot"), ComputeSpec())
