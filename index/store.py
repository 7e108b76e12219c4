"""OUT/index on disk: `meta.json` names the current index and id-map files and is written last.

A reader therefore always sees a complete build: `image.<build>.faiss`, and `ids.<build>.parquet`
mapping each FAISS id to (`shard`, `row`, `key`). Files of the previous build are removed after the
new `meta.json` is in place.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.tune import apply_tuning
from shardlight.core.errors import IndexStateError
from shardlight.core.schema import write_table
from shardlight.core.storage import exists, filesystem, is_local, join, local_path, open_read, read_bytes, write_atomic

INDEX_DIR = "index"
META = "meta.json"


def _write_index(url: str, index: faiss.Index) -> None:
    if not is_local(url):
        write_atomic(url, faiss.serialize_index(index).tobytes())
        return
    path = Path(local_path(url))  # faiss writes straight to disk: no second in-memory copy of a large index
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _read_index(url: str) -> faiss.Index:
    if is_local(url):
        return faiss.read_index(local_path(url))
    return faiss.deserialize_index(np.frombuffer(read_bytes(url), np.uint8))


def save(out: str, index: faiss.Index, ids: pa.Table, meta: dict) -> None:
    folder = join(out, INDEX_DIR)
    previous = read_meta(out, missing_ok=True)
    _write_index(join(folder, meta["files"]["index"]), index)
    write_table(join(folder, meta["files"]["ids"]), ids)
    write_atomic(join(folder, META), json.dumps(meta, indent=2).encode())
    if previous and previous.get("files") != meta["files"]:
        fs, _ = filesystem(folder)
        for name in set(previous.get("files", {}).values()) - set(meta["files"].values()):
            old = filesystem(join(folder, name))[1]
            if fs.exists(old):
                fs.rm(old)


def read_meta(out: str, missing_ok: bool = False) -> dict | None:
    url = join(out, INDEX_DIR, META)
    fs, path = filesystem(url)
    if not fs.exists(path):
        if missing_ok:
            return None
        if not exists(out):
            raise IndexStateError(f"{out} does not exist: give the output folder of a run (`shardlight run … -o OUT`)")
        raise IndexStateError(f"no index at {join(out, INDEX_DIR)}: run `shardlight index {out}` (or `shardlight run`)")
    return json.loads(read_bytes(url))


def includes_synthetic(meta: dict) -> bool:
    """Whether an index holds the generated rows (OUT/augmented); indexes built before the choice existed do."""
    return bool(meta.get("synthetic", True))


def load_index(out: str) -> tuple[faiss.Index, pa.Table, dict]:
    """The index (with its tuned search parameter applied), its id map and its metadata."""
    meta = read_meta(out)
    folder = join(out, INDEX_DIR)
    index = _read_index(join(folder, meta["files"]["index"]))
    with open_read(join(folder, meta["files"]["ids"])) as f:
        ids = pq.read_table(f)
    if index.ntotal != meta["count"] or ids.num_rows != meta["count"]:
        raise IndexStateError(f"index under {folder} is inconsistent; rebuild it with `shardlight index {out}`")
    apply_tuning(index, meta.get("tuning") or {})
    return index, ids, meta
