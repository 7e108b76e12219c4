"""Reading image embeddings out of OUT/embeddings/*.parquet in bounded batches."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

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


def iter_vectors(files: list[str], batch_rows: int = BATCH_ROWS,
                 with_ids: bool = True) -> Iterator[tuple[np.ndarray, pa.Table | None]]:
    """Yield (vectors, id columns shard/row/key/source) batches; memory stays bounded by `batch_rows`.
    `with_ids=False` reads the vectors alone (None for the ids): a third faster, for passes that only sample."""
    columns = ["key", "shard", "image_embedding"] if with_ids else ["image_embedding"]
    for url in files:
        with open_read(url) as f:
            pf = pq.ParquetFile(f)
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                emb = batch.column("image_embedding")
                vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
                ids = pa.table({"shard": batch.column("shard"),
                                "row": pa.array(np.arange(row, row + len(batch)), pa.int64()),
                                "key": batch.column("key"),
                                "source": pa.array([source_of(url)] * len(batch), pa.string())}) if with_ids else None
                row += len(batch)
                yield np.ascontiguousarray(vectors, np.float32), ids


Mapper = Callable[[Callable, list[tuple]], list]  # map(fn, [args, …]) -> [fn(*args), …] in order, anywhere


def _in_order(fn: Callable, jobs: list[tuple]) -> list:
    return [fn(*job) for job in jobs]


def sample(files: list[str], train_size: int, query_size: int, seed: int = 0,
           map_groups: Mapper | None = None, groups: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: a training sample spread evenly over the data, and random query rows (with their ids).

    Query rows are drawn from outside the training sample, so tuning measures unseen vectors. The pass reads
    every file once; `map_groups` may read `groups` contiguous groups of files elsewhere (Ray tasks: a build in
    parts, flows/index_build.py), and the rows picked are the same whichever way it runs.
    """
    sizes = [num_rows(u) for u in files]
    total = sum(sizes)
    stride = max(1, total // max(1, train_size))
    train_ids = np.arange(0, total, stride)[:train_size]
    rng = np.random.default_rng(seed)
    candidates = rng.choice(total, size=min(total, 2 * query_size + len(train_ids) // 100), replace=False)
    in_train = (candidates % stride == 0) & (candidates // stride < len(train_ids))
    unseen = candidates[~in_train]
    query_ids = np.sort((unseen if len(unseen) >= min(query_size, total // 2) else candidates)[:query_size])
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    jobs = []
    for lo, hi in _file_groups(sizes, groups):
        first, last = int(starts[lo]), int(starts[hi])
        jobs.append((files[lo:hi], *(w[(w >= first) & (w < last)] - first for w in (train_ids, query_ids))))
    picked = (map_groups if map_groups and len(jobs) > 1 else _in_order)(pick_rows, jobs)
    empty = np.zeros((0, dimension(files)), np.float32)
    return (np.concatenate([empty, *(t for t, _ in picked)]), np.concatenate([empty, *(q for _, q in picked)]),
            query_ids)


def pick_rows(files: list[str], train_rows: np.ndarray, query_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors at `train_rows` and `query_rows` (sorted, counted from the first row of `files`)."""
    train, queries, at = [], [], 0
    for vectors, _ in iter_vectors(files, with_ids=False):
        end = at + len(vectors)
        for wanted, into in ((train_rows, train), (query_rows, queries)):
            rows = wanted[(wanted >= at) & (wanted < end)] - at
            if len(rows):
                into.append(vectors[rows])
        at = end
    empty = np.zeros((0, dimension(files)), np.float32)
    return np.concatenate([empty, *train]), np.concatenate([empty, *queries])


def _file_groups(sizes: list[int], groups: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of files, contiguous, about equal in rows, at most `groups` of them."""
    groups = max(1, min(groups, len(sizes)))
    if groups == 1:
        return [(0, len(sizes))]
    target, out, lo, acc = sum(sizes) / groups, [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= target * (len(out) + 1) and len(out) < groups - 1:
            out.append((lo, i + 1))
            lo = i + 1
    return [*out, (lo, len(sizes))] if lo < len(sizes) else out
