"""Reading image embeddings out of OUT/embeddings/*.parquet in bounded batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardlight.core.layout import ROW_SOURCES, num_rows, parquet_files
from shardlight.core.storage import filesystem, open_read

BATCH_ROWS = 65_536  # vectors held in memory at once while streaming (256 MiB at 1024-d)


def embedding_files(out: str) -> list[str]:
    """OUT's per-shard embeddings files, sorted by name."""
    return parquet_files(out, "embeddings")


def index_files(out: str, synthetic: bool = True) -> list[str]:
    """Every file the index covers, in FAISS id order: input rows, then (with `synthetic`) generated rows."""
    return [u for source in (ROW_SOURCES if synthetic else ROW_SOURCES[:1]) for u in parquet_files(out, source)]


def file_name(url: str) -> str:
    """`embeddings/00000.parquet`: unique across the indexed folders."""
    return "/".join(url.replace("\\", "/").rstrip("/").rsplit("/", 2)[-2:])


def source_of(url: str) -> str:
    return file_name(url).split("/", 1)[0]


def signature(url: str) -> str:
    """Name, size and row count: changes whenever a shard's embeddings are rewritten."""
    fs, path = filesystem(url)
    return f"{file_name(url)}:{fs.size(path)}:{num_rows(url)}"


def fingerprint(files: list[str]) -> str:
    """Identifies the input of a build: each embeddings file's name, size and row count."""
    h = hashlib.sha256()
    for url in files:
        h.update(f"{signature(url)}\n".encode())
    return h.hexdigest()[:16]


def dimension(files: list[str]) -> int:
    with open_read(files[0]) as f:
        return pq.ParquetFile(f).schema_arrow.field("image_embedding").type.list_size


def iter_vectors(files: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Yield (vectors, id columns shard/row/key/source) batches; memory stays bounded by `batch_rows`."""
    for url in files:
        with open_read(url) as f:
            pf = pq.ParquetFile(f)
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["key", "shard", "image_embedding"]):
                emb = batch.column("image_embedding")
                vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
                ids = pa.table({"shard": batch.column("shard"),
                                "row": pa.array(np.arange(row, row + len(batch)), pa.int64()),
                                "key": batch.column("key"),
                                "source": pa.array([source_of(url)] * len(batch), pa.string())})
                row += len(batch)
                yield np.ascontiguousarray(vectors, np.float32), ids


def sample(files: list[str], train_size: int, query_size: int,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: a training sample spread evenly over the data, and random query rows (with their ids).

    Query rows are drawn from outside the training sample, so tuning measures unseen vectors.
    """
    total = sum(num_rows(u) for u in files)
    stride = max(1, total // max(1, train_size))
    train_ids = np.arange(0, total, stride)[:train_size]
    rng = np.random.default_rng(seed)
    candidates = rng.choice(total, size=min(total, 2 * query_size + len(train_ids) // 100), replace=False)
    in_train = (candidates % stride == 0) & (candidates // stride < len(train_ids))
    unseen = candidates[~in_train]
    query_ids = np.sort((unseen if len(unseen) >= min(query_size, total // 2) else candidates)[:query_size])
    train, queries, first = [], [], 0
    for vectors, _ in iter_vectors(files):
        last = first + len(vectors)
        for wanted, into in ((train_ids, train), (query_ids, queries)):
            picked = wanted[(wanted >= first) & (wanted < last)] - first
            if len(picked):
                into.append(vectors[picked])
        first = last
    empty = np.zeros((0, dimension(files)), np.float32)
    return np.concatenate([empty, *train]), np.concatenate([empty, *queries]), query_ids
