"""Build a FAISS inner-product index over the image embeddings, streaming over the Parquet files.

Layout under OUT/index/: `meta.json` names the current index and id-map files (written last, so a
reader always sees a complete build), `image.<build>.faiss`, and `ids.<build>.parquet` mapping each
FAISS id to (`shard`, `row`, `key`). The index is derived data: it can always be rebuilt from Parquet.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import IndexStateError
from workers.schema import write_table
from workers.storage import filesystem, join, open_read, read_bytes, write_atomic

INDEX_DIR = "index"
META = "meta.json"


def embedding_files(out: str) -> list[str]:
    fs, path = filesystem(join(out, "embeddings"))
    if not fs.exists(path):
        return []
    protocol = "" if "://" not in out else out.split("://", 1)[0] + "://"
    return sorted(protocol + p for p in fs.glob(f"{path}/*.parquet"))


def num_rows(url: str) -> int:
    with open_read(url) as f:
        return pq.ParquetFile(f).metadata.num_rows


def fingerprint(files: list[str]) -> str:
    """Identifies the input of a build: each embeddings file's name, size and row count."""
    h = hashlib.sha256()
    for url in files:
        fs, path = filesystem(url)
        h.update(f"{path.rsplit('/', 1)[-1]}:{fs.size(path)}:{num_rows(url)}\n".encode())
    return h.hexdigest()[:16]


def iter_vectors(files: list[str], batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Yield (vectors, id columns) batches; memory stays bounded by `batch_rows`."""
    for url in files:
        with open_read(url) as f:
            pf = pq.ParquetFile(f)
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["key", "shard", "image_embedding"]):
                emb = batch.column("image_embedding")
                dim = emb.type.list_size
                vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
                ids = pa.table({"shard": batch.column("shard"), "row": pa.array(np.arange(row, row + len(batch)),
                               pa.int64()), "key": batch.column("key")})
                row += len(batch)
                yield vectors, ids


def _dimension(files: list[str]) -> int:
    with open_read(files[0]) as f:
        return pq.ParquetFile(f).schema_arrow.field("image_embedding").type.list_size


def _training_sample(files: list[str], size: int) -> np.ndarray:
    """Every n-th vector across the data set, so the sample covers all shards."""
    total = sum(num_rows(u) for u in files)
    stride = max(1, total // size)
    picked = [v[::stride] for v, _ in iter_vectors(files)]
    return np.concatenate(picked)[:size]


def build_index(out: str, factory: str = "Flat", train_sample: int = 100_000, nprobe: int | None = None,
                model: dict | None = None) -> dict:
    """Build (or rebuild) OUT/index from OUT/embeddings and return its metadata."""
    files = embedding_files(out)
    if not files:
        raise IndexStateError(f"no embeddings under {join(out, 'embeddings')}: run `shardlight run` first")
    start = time.perf_counter()
    dim = _dimension(files)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexStateError(f"bad FAISS factory string {factory!r}: {str(err).strip().splitlines()[-1]}") from None
    if not index.is_trained:
        index.train(_training_sample(files, train_sample))
    id_tables = []
    for vectors, ids in iter_vectors(files):
        index.add(vectors)
        id_tables.append(ids)
    if nprobe is not None and hasattr(index, "nprobe"):
        faiss.extract_index_ivf(index).nprobe = nprobe
    build = fingerprint(files)
    meta = {
        "count": int(index.ntotal), "dim": dim, "factory": factory, "metric": "inner_product",
        "nprobe": nprobe, "model": model or {}, "fingerprint": build, "shards": len(files),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - start, 3),
        "files": {"index": f"image.{build}.faiss", "ids": f"ids.{build}.parquet"},
    }
    _save(out, index, pa.concat_tables(id_tables) if id_tables else None, meta)
    return meta


def _save(out: str, index, ids: pa.Table, meta: dict) -> None:
    folder = join(out, INDEX_DIR)
    previous = read_meta(out, missing_ok=True)
    write_atomic(join(folder, meta["files"]["index"]), faiss.serialize_index(index).tobytes())
    write_table(join(folder, meta["files"]["ids"]), ids)
    write_atomic(join(folder, META), json.dumps(meta, indent=2).encode())
    if previous and previous.get("files") != meta["files"]:
        fs, _ = filesystem(folder)
        for name in previous.get("files", {}).values():
            old = filesystem(join(folder, name))[1]
            if fs.exists(old):
                fs.rm(old)


def read_meta(out: str, missing_ok: bool = False) -> dict | None:
    url = join(out, INDEX_DIR, META)
    fs, path = filesystem(url)
    if not fs.exists(path):
        if missing_ok:
            return None
        raise IndexStateError(f"no index at {join(out, INDEX_DIR)}: run `shardlight index {out}` (or `shardlight run`)")
    return json.loads(read_bytes(url))


def load_index(out: str) -> tuple[faiss.Index, pa.Table, dict]:
    meta = read_meta(out)
    folder = join(out, INDEX_DIR)
    index = faiss.deserialize_index(np.frombuffer(read_bytes(join(folder, meta["files"]["index"])), np.uint8))
    with open_read(join(folder, meta["files"]["ids"])) as f:
        ids = pq.read_table(f)
    if index.ntotal != meta["count"] or ids.num_rows != meta["count"]:
        raise IndexStateError(f"index under {folder} is inconsistent; rebuild it with `shardlight index {out}`")
    return index, ids, meta
