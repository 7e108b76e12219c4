"""One streaming pass over a run's Parquet for the report: counts, a score histogram, the extreme pairs,
per-label examples and a bounded sample of image embeddings for the map.

Memory stays bounded whatever the row count: counts and histograms are accumulated per batch, examples
are per-label reservoirs, and the map keeps every n-th vector (at most `MAP_MAX`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from shardlight.core.layout import parquet_files, read_stats
from shardlight.core.storage import open_read

MAP_MAX = 5_000  # embeddings kept for the 2-D map
EXAMPLES_PER_LABEL = 6
EXTREMES = 10  # lowest- and highest-scoring pairs shown
AUGMENTED_SHOWN = 200  # synthetic rows sampled for the augmentation grids
SCORE_EDGES = np.linspace(-1.0, 1.0, 2001)  # fine fixed bins; the plot re-bins to the occupied range
BATCH_ROWS = 8_192
COLUMNS = ("key", "shard", "caption", "label", "label_prob", "clip_score", "tar_offset", "tar_size",
           "image_embedding", "synthetic", "source_key", "target_label")


@dataclass(frozen=True)
class Sample:
    """One row the report shows, with what it takes to find its image again."""

    key: str
    shard: str
    caption: str | None = None
    label: str | None = None
    score: float | None = None
    prob: float | None = None
    tar_offset: int | None = None
    tar_size: int | None = None
    synthetic: bool = False
    source_key: str | None = None


@dataclass
class Scan:
    """What the report plots, gathered in one pass."""

    label_counts: Counter = field(default_factory=Counter)
    synthetic_label_counts: Counter = field(default_factory=Counter)
    score_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_EDGES) - 1, np.int64))
    lowest: list[Sample] = field(default_factory=list)
    highest: list[Sample] = field(default_factory=list)
    examples: dict[str, list[Sample]] = field(default_factory=dict)
    augmented: list[Sample] = field(default_factory=list)  # reservoir of synthetic rows
    map_vectors: list[np.ndarray] = field(default_factory=list)
    map_labels: list[str] = field(default_factory=list)
    map_synthetic: list[bool] = field(default_factory=list)
    source_urls: dict[str, str] = field(default_factory=dict)  # shard name -> input shard URL


class _Scanner:
    def __init__(self, total_rows: int, seed: int = 0):
        self.scan = Scan()
        self.stride = max(1, math.ceil(total_rows / MAP_MAX))
        self.seen: Counter = Counter()  # rows seen per label (real) for the reservoirs
        self.synthetic_seen = 0
        self.row = 0
        self.rng = random.Random(seed)

    def add_file(self, url: str, synthetic: bool) -> None:
        stats = read_stats(url)
        if stats.get("shard") and stats.get("url"):
            self.scan.source_urls.setdefault(stats["shard"], stats["url"])
        with open_read(url) as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in COLUMNS if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                self._add_batch(batch, synthetic)

    def _add_batch(self, batch: pa.RecordBatch, synthetic: bool) -> None:
        """Rows become Python objects only when a sample is kept; counts and scores stay columnar."""
        names = batch.schema.names
        label_col = "label" if "label" in names else "target_label" if "target_label" in names else None
        labels = batch.column(label_col).to_pylist() if label_col else [None] * len(batch)
        counts = self.scan.synthetic_label_counts if synthetic else self.scan.label_counts
        counts.update(x for x in labels if x is not None)
        if synthetic:
            for i in range(len(batch)):
                self.synthetic_seen += 1
                _reservoir(self.scan.augmented, lambda i=i: _sample(batch, i, True), self.synthetic_seen,
                           AUGMENTED_SHOWN, self.rng)
        else:
            if "clip_score" in names:
                self._scores(batch)
            self._reservoir_labels(batch, labels)
        self._map(batch, labels, synthetic)
        self.row += len(batch)

    def _scores(self, batch: pa.RecordBatch) -> None:
        scores = batch.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
        valid = np.flatnonzero(~np.isnan(scores))
        self.scan.score_hist += np.histogram(np.clip(scores[valid], -1, 1), SCORE_EDGES)[0]
        order = valid[np.argsort(scores[valid], kind="stable")]
        low = [_sample(batch, int(i), False) for i in order[:EXTREMES]]
        high = [_sample(batch, int(i), False) for i in order[::-1][:EXTREMES]]
        self.scan.lowest = sorted(self.scan.lowest + low, key=lambda s: s.score)[:EXTREMES]
        self.scan.highest = sorted(self.scan.highest + high, key=lambda s: -s.score)[:EXTREMES]

    def _reservoir_labels(self, batch: pa.RecordBatch, labels: list) -> None:
        for i, label in enumerate(labels):
            if label is None:
                continue
            self.seen[label] += 1
            _reservoir(self.scan.examples.setdefault(label, []), lambda i=i: _sample(batch, i, False),
                       self.seen[label], EXAMPLES_PER_LABEL, self.rng)

    def _map(self, batch, labels: list, synthetic: bool) -> None:
        if "image_embedding" not in batch.schema.names:
            return
        picked = np.flatnonzero((self.row + np.arange(len(batch))) % self.stride == 0)
        if not picked.size:
            return
        emb = batch.column("image_embedding")
        vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)  # respects slices
        self.scan.map_vectors.append(vectors[picked].astype(np.float32))
        self.scan.map_labels += [labels[i] or "(none)" for i in picked]
        self.scan.map_synthetic += [synthetic] * len(picked)


def _reservoir(kept: list, make, seen: int, size: int, rng: random.Random) -> None:
    """Reservoir sampling: each of the `seen` items so far is kept with probability size/seen.

    `make` builds the item, so only the items that are kept are ever built.
    """
    if len(kept) < size:
        kept.append(make())
    elif (j := rng.randrange(seen)) < size:
        kept[j] = make()


def _sample(batch: pa.RecordBatch, i: int, synthetic: bool) -> Sample:
    row = {k: v[0] for k, v in batch.slice(i, 1).drop_columns(
        [c for c in ("image_embedding",) if c in batch.schema.names]).to_pydict().items()}
    return _sample_from(row, synthetic)


def _sample_from(row: dict, synthetic: bool) -> Sample:
    return Sample(key=row.get("key"), shard=row.get("shard"), caption=row.get("caption"),
                  label=row.get("label") or row.get("target_label"), score=row.get("clip_score"),
                  prob=row.get("label_prob"), tar_offset=row.get("tar_offset"), tar_size=row.get("tar_size"),
                  synthetic=synthetic or bool(row.get("synthetic")), source_key=row.get("source_key"))


def _rows(url: str) -> int:
    with open_read(url) as f:
        return pq.ParquetFile(f).metadata.num_rows


def scan_run(out: str, seed: int = 0) -> Scan:
    """Stream OUT/embeddings and OUT/augmented once and gather everything the plots need."""
    real, synthetic = parquet_files(out, "embeddings"), parquet_files(out, "augmented")
    scanner = _Scanner(sum(_rows(u) for u in real + synthetic), seed)
    for url in real:
        scanner.add_file(url, synthetic=False)
    for url in synthetic:
        scanner.add_file(url, synthetic=True)
    return scanner.scan


def find_rows(out: str, keys: set[str]) -> dict[str, Sample]:
    """Look up rows by key across OUT/embeddings and OUT/augmented (streamed; for dedup and aug sources)."""
    found: dict[str, Sample] = {}
    for folder, synthetic in (("embeddings", False), ("augmented", True)):
        for url in parquet_files(out, folder):
            with open_read(url) as f:
                pf = pq.ParquetFile(f)
                columns = [c for c in COLUMNS if c in pf.schema_arrow.names and c != "image_embedding"]
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    hit = batch.filter(pc.is_in(batch.column("key"), value_set=_array(keys)))
                    for row in hit.to_pylist():
                        found[row["key"]] = _sample_from(row, synthetic)
    return found


def _array(keys: set[str]) -> pa.Array:
    return pa.array(sorted(keys), pa.string())


def project_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates for the map: UMAP when it is installed (and there are enough points), else PCA."""
    if len(vectors) >= 50:
        try:
            import umap  # optional; not a dependency
            return umap.UMAP(n_components=2, random_state=seed).fit_transform(vectors), "UMAP"
        except ImportError:
            pass
    centred = (vectors - vectors.mean(axis=0, keepdims=True)).astype(np.float64)
    if len(centred) < 2:
        return np.zeros((len(centred), 2)), "PCA"
    # The top eigenvectors of the dim×dim covariance: far cheaper than an SVD of the n×dim sample. torch's
    # (MKL) eigh, not numpy's: OpenBLAS's threaded eigh slows down by 10× when another process wants the cores.
    _, eigvecs = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(centred.T @ centred)))
    axes = eigvecs[:, ::-1][:, :2]
    xy = centred @ axes
    return (xy if xy.shape[1] == 2 else np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))), "PCA"
