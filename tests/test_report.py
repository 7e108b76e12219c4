"""The run report: summary numbers, streaming scan, thumbnails, charts and the rendered page."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "PREFECT_HOME" not in os.environ:  # a throwaway Prefect database, not the user's
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="shardlight-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # shared, slow CI machines
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from flows.report import data as report_data  # noqa: E402
from flows.report.build import build_report  # noqa: E402
from flows.report.data import Sample, project_2d, scan_run  # noqa: E402
from flows.report.images import read_images  # noqa: E402
from flows.report.summary import collect_summary, summary_markdown  # noqa: E402
from shardlight.core.errors import InputError  # noqa: E402
from shardlight.core.layout import STATS_KEY  # noqa: E402
from shardlight.core.schema import (  # noqa: E402
    Row,
    SampleError,  # noqa: E402
    errors_table,
    rows_table,
    write_table,
)
from shardlight.training.synthetic import write_shards  # noqa: E402
from workers.reader import ShardReader, decode  # noqa: E402

DIM = 8


# Helpers: damaged shards and a run folder written without models.

def damage_shard(tar_path: Path, gzip_it: bool = True) -> Path:
    """Rewrite a shard with its first image corrupted and one sample that has no image (optionally .tar.gz)."""
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isreg()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        first_jpg = next(m.name for m, _ in members if m.name.endswith(".jpg"))
        for member, data in members:
            data = b"not a jpeg" if member.name == first_jpg else data
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
        orphan = tarfile.TarInfo("zz-orphan.txt")
        orphan.size = 5
        dst.addfile(orphan, io.BytesIO(b"hello"))
    tar_path.unlink()
    target = tar_path.with_name(tar_path.name + ".gz") if gzip_it else tar_path
    target.write_bytes(gzip.compress(buf.getvalue()) if gzip_it else buf.getvalue())
    return target


def fake_run(out: Path, shards: list[Path], seed: int = 0) -> None:
    """Read real shards with the real reader and write embeddings/errors Parquet with random vectors."""
    rng = np.random.default_rng(seed)
    for url in shards:
        reader = ShardReader(str(url))
        items = [item if isinstance(item, SampleError) else decode(item) for item in reader]
        raws = [d.raw for d in items if not isinstance(d, SampleError)]
        errors = [e for e in items if isinstance(e, SampleError)]
        n = len(raws)
        vectors = rng.normal(size=(n, DIM)).astype(np.float32)
        labels = [r.meta["label"] for r in raws]
        scores = rng.uniform(-0.3, 0.6, n).tolist()
        rows = [Row(key=r.key, shard=r.shard, caption=r.caption, url=r.meta.get("url"), width=64, height=64,
                    image_format=r.image_format, tar_offset=r.tar_offset, tar_size=r.tar_size,
                    image_embedding=vectors[i], text_embedding=vectors[n - 1 - i], clip_score=scores[i],
                    label_id=r.meta["label_id"], label=labels[i], label_prob=0.9, topk_ids=[r.meta["label_id"]],
                    topk_probs=[0.9]) for i, r in enumerate(raws)]
        stats = {"shard": reader.name, "url": str(url), "samples_read": n + len(errors), "rows": n,
                 "errors": len(errors), "seconds": 0.5, "images_per_s": n / 0.5}
        write_table(str(out / "embeddings" / f"{reader.name}.parquet"), rows_table(rows, DIM),
                    {STATS_KEY: json.dumps(stats).encode()})
        write_table(str(out / "errors" / f"{reader.name}.parquet"), errors_table(errors))


def add_augmentations(out: Path, shard: str = "00000", n: int = 6) -> None:
    """OUT/augmented/<shard>.{tar,parquet}: flipped copies of real rows, marked synthetic."""
    import webdataset as wds

    source = pq.read_table(out / "embeddings" / f"{shard}.parquet").slice(0, n).to_pydict()
    (out / "augmented").mkdir(exist_ok=True)
    with wds.TarWriter(str(out / "augmented" / f"{shard}.tar")) as sink:
        for key in source["key"]:
            img = Image.new("RGB", (32, 32), (200, 30, 30))
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            sink.write({"__key__": f"aug-{key}", "jpg": buf.getvalue()})
    emb = pa.array(source["image_embedding"], pa.list_(pa.float32(), DIM))
    table = pa.table({"key": [f"aug-{k}" for k in source["key"]], "shard": [shard] * n, "synthetic": [True] * n,
                      "source_key": source["key"], "target_label": source["label"], "label": source["label"],
                      "image_embedding": emb})
    pq.write_table(table, out / "augmented" / f"{shard}.parquet")


def add_duplicates(out: Path, keys: list[str]) -> None:
    """OUT/dedup/duplicates.parquet as index/dedup.py writes it: one group, its first key kept."""
    (out / "dedup").mkdir(exist_ok=True)
    n = len(keys)
    pq.write_table(pa.table({"group": [7] * n, "key": keys, "shard": ["00000"] * n, "row": list(range(n)),
                             "representative": [i == 0 for i in range(n)], "similarity": [0.99] * n}),
                   out / "dedup" / "duplicates.parquet")


def png_paths(page: Path) -> list[Path]:
    return [page.parent / name for name in re.findall(r'src="([^"]+\.png)"', page.read_text())]


def assert_png_ok(path: Path) -> None:
    assert path.exists(), path
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"), np.float32)
    assert pixels.var() > 0, f"{path} is blank"


def parquet_truth(out: Path) -> dict:
    """Rows, dropped errors and shards read straight from the Parquet files, independently of the report."""
    rows = sum(pq.read_metadata(p).num_rows for p in (out / "embeddings").glob("*.parquet"))
    errors = pa.concat_tables([pq.read_table(p) for p in (out / "errors").glob("*.parquet")])
    dropped = sum(errors.column("dropped").to_pylist())
    return {"rows": rows, "errors": dropped, "shards": len(list((out / "embeddings").glob("*.parquet")))}


def html_fact(page: Path, name: str) -> str:
    match = re.search(rf"<th>{re.escape(name)}</th><td>([^<]*)</td>", page.read_text())
    assert match, f"no {name!r} row in the summary"
    return match.group(1).replace(",", "")


@pytest.fixture()
def small_run(tmp_path) -> Path:
    data, out = tmp_path / "data", tmp_path / "out"
    shards = write_shards(data, shards=2, samples_per_shard=10, seed=3)
    shards[1] = damage_shard(shards[1])
    fake_run(out, shards)
    return out


# Fast unit tests on Parquet written without models.

def test_summary_counts_match_parquet(small_run):
    s = collect_summary(str(small_run))
    truth = parquet_truth(small_run)
    assert (s.rows, s.errors, s.shards) == (truth["rows"], truth["errors"], truth["shards"]) == (19, 2, 2)
    assert s.samples_read == 21
    assert sum(s.errors_by_reason.values()) == 2
    assert any(reason.startswith("decode: ") for reason in s.errors_by_reason)
    assert s.synthetic_rows == 0 and s.dedup is None and s.index is None


def test_summary_markdown_links_the_report(small_run):
    text = summary_markdown(str(small_run))
    assert "| rows | 19 |" in text and "| errors (dropped) | 2 |" in text
    assert (small_run / "report" / "index.html").resolve().as_uri() in text
    assert "errors by reason" in text


def test_scan_streams_counts_and_bounds_the_map(small_run, monkeypatch):
    monkeypatch.setattr(report_data, "MAP_MAX", 5)
    monkeypatch.setattr(report_data, "BATCH_ROWS", 4)
    scan = scan_run(str(small_run))
    labels = pa.concat_tables([pq.read_table(p, columns=["label", "clip_score"])
                               for p in (small_run / "embeddings").glob("*.parquet")])
    assert sum(scan.label_counts.values()) == 19
    assert len(np.concatenate(scan.map_vectors)) <= 5 + 1
    scores = sorted(labels.column("clip_score").to_pylist())
    assert [s.score for s in scan.lowest] == pytest.approx(scores[:report_data.EXTREMES])
    assert scan.highest[0].score == pytest.approx(scores[-1])
    assert all(len(v) <= report_data.EXAMPLES_PER_LABEL for v in scan.examples.values())


def test_thumbnails_by_offset_and_by_scanning_a_gz_shard(small_run):
    scan = scan_run(str(small_run))
    samples = [s for ex in scan.examples.values() for s in ex]
    images = read_images(str(small_run), samples, scan.source_urls)
    assert {s.shard for s in samples} == {"00000", "00001"}
    for s in samples:
        with Image.open(io.BytesIO(images[s.key])) as img:
            assert img.size == (64, 64)
    assert read_images(str(small_run), [Sample(key="x", shard="gone")], {"gone": "/nope.tar"}) == {"x": None}


def test_pca_separates_two_clusters():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(0, 0.1, (30, 16)), rng.normal(3, 0.1, (30, 16))])
    xy, method = project_2d(vectors)
    assert xy.shape == (60, 2) and method in ("PCA", "UMAP")
    assert abs(xy[:30, 0].mean() - xy[30:, 0].mean()) > 1


def test_report_shows_augmentations_and_duplicates(small_run):
    add_augmentations(small_run)
    keys = pq.read_table(small_run / "embeddings" / "00000.parquet", columns=["key"]).column("key").to_pylist()
    add_duplicates(small_run, keys[:3])
    page = build_report(str(small_run))
    text = page.read_text()
    assert "Augmentations" in text and "Source → variations" in text and "Near-duplicate groups" in text
    assert "group 7<br><small>3 members" in text and "<figcaption>kept</figcaption>" in text
    summary = collect_summary(str(small_run))
    assert summary.synthetic_rows == 6 and summary.dedup == {"groups": 1, "duplicates": 2, "threshold": None}
    assert text.count("data:image/jpeg;base64,") >= 19 + 6
    for png in png_paths(page):
        assert_png_ok(png)


@pytest.fixture()
def drawn(monkeypatch) -> dict:
    """The matplotlib figures behind each PNG the report writes, by file name, kept open for inspection."""
    from flows.report import plots

    figures, png = {}, plots._png
    titles = {"label distribution": "labels.png", "image-text agreement": "scores.png", "image embeddings": "map.png"}

    def keep(fig):
        title = fig.axes[0].get_title()
        figures[next(name for prefix, name in titles.items() if title.startswith(prefix))] = fig
        return png(fig)

    monkeypatch.setattr(plots, "_png", keep)
    return figures


def _parquet_rows(out: Path) -> tuple[pa.Table, pa.Table]:
    real = pa.concat_tables([pq.read_table(p) for p in sorted((out / "embeddings").glob("*.parquet"))])
    return real, pq.read_table(out / "augmented" / "00000.parquet")


def test_plots_draw_the_parquet_data(small_run, drawn):
    """The bars, histogram and map points drawn are the Parquet's labels, scores and (PCA of) embeddings."""
    add_augmentations(small_run)
    build_report(str(small_run))
    real, synth = _parquet_rows(small_run)
    real_labels, synth_labels = Counter(real.column("label").to_pylist()), Counter(synth.column("label").to_pylist())

    ax = drawn["labels.png"].axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(names) == sorted(real_labels | synth_labels)  # every label, none invented
    real_bars, synth_bars = ax.containers
    assert [b.get_width() for b in real_bars] == [real_labels[n] for n in names]
    assert [b.get_width() for b in synth_bars] == [synth_labels[n] for n in names]

    scores = np.array([x for x in real.column("clip_score").to_pylist() if x is not None])
    bars = drawn["scores.png"].axes[0].patches
    assert sum(b.get_height() for b in bars) == len(scores) == 19
    for b in bars:  # each bar counts exactly the scores inside it
        inside = (scores >= b.get_x()) & (scores < b.get_x() + b.get_width())
        assert b.get_height() == inside.sum(), (b.get_x(), b.get_width())

    vectors = np.concatenate([np.stack(t.column("image_embedding").to_numpy(zero_copy_only=False))
                              for t in (real, synth)]).astype(np.float64)
    tags = [(label, False) for label in real.column("label").to_pylist()]
    tags += [(label, True) for label in synth.column("label").to_pylist()]
    centred = vectors - vectors.mean(axis=0)
    expected = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T  # PCA, computed here
    got = _map_points(drawn["map.png"].axes[0])
    want = _points_by_tag(expected * _signs(expected, drawn["map.png"].axes[0]), tags)
    assert set(got) == set(want) and sum(map(len, got.values())) == 19 + 6
    for tag, points in want.items():
        np.testing.assert_allclose(got[tag], points, atol=1e-4, err_msg=str(tag))


def _map_points(ax) -> dict:
    """{(label, synthetic): sorted points} as drawn: a label's scatter, then its synthetic crosses if any."""
    points, name = {}, None
    for c in ax.collections:
        xy = np.asarray(c.get_offsets(), np.float64)
        if not len(xy):
            continue  # the legend's empty "synthetic (x)" entry
        synthetic = c.get_label().startswith("_")
        name = name if synthetic else c.get_label()
        points[(name, synthetic)] = sorted(map(tuple, xy.round(6)))
    return points


def _points_by_tag(xy: np.ndarray, tags: list) -> dict:
    grouped: dict = {}
    for point, tag in zip(xy, tags):
        grouped.setdefault(tag, []).append(tuple(point.round(6)))
    return {tag: sorted(v) for tag, v in grouped.items()}


def _signs(expected: np.ndarray, ax) -> np.ndarray:
    """PCA axes are defined up to sign: take each axis's sign from the drawn points' spread."""
    drawn_xy = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections if len(c.get_offsets())])
    skew = lambda v: float(((v - v.mean()) ** 3).sum())  # noqa: E731  sign-sensitive, order-free
    return np.array([np.sign(skew(drawn_xy[:, j]) * skew(expected[:, j])) or 1.0 for j in range(2)])


def test_report_without_labels_or_scores(tmp_path):
    out = tmp_path / "out"
    fake_run(out, write_shards(tmp_path / "data", shards=1, samples_per_shard=4, seed=1))
    path = out / "embeddings" / "00000.parquet"
    table = pq.read_table(path)
    nulls = {name: pa.nulls(table.num_rows, table.schema.field(name).type) for name in ("label", "clip_score")}
    for name, column in nulls.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    write_table(str(path), table)
    page = build_report(str(out))
    assert "No labels in this run" in page.read_text()
    assert {p.name for p in png_paths(page)} == {"map.png"}


def test_index_recall_models_and_error_reasons_in_the_summary(small_run):
    meta = {"count": 19, "dim": DIM, "factory": "IVF4,Flat", "build_seconds": 0.5,
            "tuning": {"param": "nprobe", "value": 2, "recall_at_k": 0.97, "k": 10, "qps": 1234.0}}
    (small_run / "index").mkdir()
    (small_run / "index" / "meta.json").write_text(json.dumps(meta))
    errors = errors_table([SampleError(f"k{i}", "00009", "decode", f"bad <_io.BytesIO object at 0x7f{i:04x}>")
                           for i in range(3)])
    write_table(str(small_run / "errors" / "00009.parquet"), errors)
    config = {"clip": {"model": "shapes-clip", "pretrained": "/any/where/shapes-clip.safetensors"},
              "labels": {"kind": "vit", "model": "shapes-vit", "checkpoint": None, "pretrained": False}}
    (small_run / "run.json").write_text(json.dumps({"config": config, "code_version": "abc123"}))
    s = collect_summary(str(small_run))
    facts = dict(s.rows_for_display())
    assert facts["model: clip"] == "shapes-clip (shapes-clip.safetensors)"
    assert facts["model: labels"] == "vit: shapes-vit" and facts["code version"] == "abc123"
    assert "measured recall@10 0.9700 (nprobe=2)" in facts["index"]
    assert s.errors_by_reason["decode: bad <_io.BytesIO object at 0x…>"] == 3
    assert "throughput: index build" in facts


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(InputError):
        build_report(str(tmp_path))


# The real pipeline end to end.

@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    from flows.pipeline import pipeline
    from shardlight.core.config import parse_config

    root = tmp_path_factory.mktemp("report-real")
    shards = write_shards(root / "data", shards=2, samples_per_shard=8, seed=5)
    damage_shard(shards[1])
    cfg = parse_config({"input": str(root / "data"), "output": str(root / "out"),
                        "clip": {"model": "shapes-clip"}, "labels": {"kind": "vit", "model": "shapes-vit"},
                        "ray": {"num_cpus": 2, "num_actors": 1}})
    summary = pipeline(cfg.model_dump())
    assert not summary["failed"]
    return root / "out"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_of_a_real_run(real_run):
    page = build_report(str(real_run))
    pngs = png_paths(page)
    assert {p.name for p in pngs} == {"labels.png", "scores.png", "map.png"}
    for png in pngs:
        assert_png_ok(png)
    truth = parquet_truth(real_run)
    assert truth == {"rows": 15, "errors": 2, "shards": 2}
    assert html_fact(page, "rows") == str(truth["rows"])
    assert html_fact(page, "errors (dropped)") == str(truth["errors"])
    assert html_fact(page, "shards") == str(truth["shards"])
    assert html_fact(page, "samples read") == str(truth["rows"] + truth["errors"])
    assert "Flat" in html_fact(page, "index")
    markdown = summary_markdown(str(real_run))  # the same summary, as the Prefect artifact shows it
    assert f"| rows | {truth['rows']} |" in markdown and f"| shards | {truth['shards']} |" in markdown
    text = page.read_text()
    assert 'class="noimg"' not in text  # every thumbnail was found (by offset or by scanning the .tar.gz)
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing to fetch: the page works offline
