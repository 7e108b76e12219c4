"""Groups of near-duplicate images, found with the index, written to OUT/dedup/duplicates.parquet.

    >>> from index.dedup import dedup
    >>> dedup("out")                   # at DEDUP_THRESHOLD (index/__init__.py), the cosine of near-duplicates
    >>> dedup("out", threshold=0.97)   # looser: also near-identical compositions

Every vector asks the index for its `neighbors` nearest rows; pairs at or above the threshold are
edges, and connected components of that graph are the groups (as in NeMo Curator's semantic dedup and
clip-retrieval's result dedup). Each group keeps its lowest-id row as the representative; the others
are the duplicates a user would drop. Memory: one batch of vectors plus the edges found.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import DEDUP_THRESHOLD
from index.store import includes_synthetic, load_index
from index.vectors import fingerprint, index_files, iter_vectors
from shardlight.core.errors import IndexStateError, InputError
from shardlight.core.schema import write_table
from shardlight.core.storage import join

DEDUP_DIR = "dedup"
DEDUP_KEY = b"shardlight.dedup"  # Parquet metadata: the settings the groups were found with
BATCH = 4096  # query vectors per index search


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (its smallest node id) of each of n nodes joined by edges a[i]–b[i]."""
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        labels = labels[labels]  # pointer jumping: follow labels to their current root
        if np.array_equal(labels, before):
            return labels


def find_edges(index, files: list[str], threshold: float, neighbors: int) -> tuple[np.ndarray, ...]:
    """(a, b, similarity) of every pair within `neighbors` of each other at or above `threshold`."""
    found_a, found_b, found_s, first = [], [], [], 0
    for vectors, _ in iter_vectors(files, batch_rows=BATCH):
        scores, ids = index.search(vectors, neighbors + 1)
        queries = np.arange(first, first + len(vectors))[:, None].repeat(ids.shape[1], axis=1)
        keep = (scores >= threshold) & (ids >= 0) & (ids != queries)
        found_a.append(queries[keep])
        found_b.append(ids[keep])
        found_s.append(scores[keep])
        first += len(vectors)
    return np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)


def dedup(out: str, threshold: float = DEDUP_THRESHOLD, neighbors: int = 16) -> dict:
    """Write OUT/dedup/duplicates.parquet and return a summary.

    Args:
        out: the run's output folder or URL (its index must be up to date).
        threshold: cosine similarity at or above which two images are near-duplicates.
        neighbors: nearest rows examined per image (a larger group is still found through its links).

    The Parquet file has one row per member of a group of two or more: `group` (the representative's
    FAISS id), `key`, `shard`, `row`, `synthetic` (a DiT-generated row, from OUT/augmented),
    `representative` (kept), `similarity` (strongest link found).
    """
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold {threshold} is not a cosine similarity in [-1, 1]")
    index, ids, meta = load_index(out, mmap=True)
    files = index_files(out, includes_synthetic(meta))
    if meta.get("fingerprint") != fingerprint(files):
        raise IndexStateError(f"the index is older than the Parquet files under {out}: "
                              f"run `shardlight index-update {out}`")
    a, b, sims = find_edges(index, files, threshold, min(neighbors, max(1, index.ntotal - 1)))
    labels = components(index.ntotal, a, b)
    best = np.full(index.ntotal, np.nan, np.float32)
    np.fmax.at(best, a, sims)
    np.fmax.at(best, b, sims)
    sizes = np.bincount(labels, minlength=index.ntotal)
    members = np.flatnonzero(sizes[labels] > 1)
    members = members[np.lexsort((members, labels[members]))]  # by group, representative first
    picked = ids.take(pa.array(members))
    table = pa.table({
        "group": pa.array(labels[members], pa.int64()),
        "key": picked.column("key"),
        "shard": picked.column("shard"),
        "row": picked.column("row"),
        "synthetic": _synthetic(picked),
        "representative": pa.array(labels[members] == members),
        "similarity": pa.array(best[members], pa.float32()),
    })
    path = join(out, DEDUP_DIR, "duplicates.parquet")
    write_table(path, table, {DEDUP_KEY: json.dumps({"threshold": threshold, "neighbors": neighbors}).encode()})
    groups = int((sizes > 1).sum())
    return {"path": path, "threshold": threshold, "groups": groups, "duplicates": int(len(members) - groups),
            "rows": int(index.ntotal), "synthetic_members": int(pc.sum(table.column("synthetic")).as_py() or 0)}


def _synthetic(ids: pa.Table) -> pa.Array:
    """Whether each id-map row is a DiT-generated row (OUT/augmented); an id map from before its `source`
    column cannot tell, and says False."""
    if "source" not in ids.column_names:
        return pa.array([False] * ids.num_rows, pa.bool_())
    return pc.equal(ids.column("source"), "augmented").combine_chunks()
