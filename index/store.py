"""OUT/index on disk: `meta.json` names the current index and id-map files and is written last.

A reader therefore always sees a complete build: `image.<build>.faiss`, `ids.<build>.parquet` mapping
each FAISS id to (`shard`, `row`, `key`), and for an index re-ranked from float16 vectors
(`…,Refine(SQfp16)`, index/rerank.py) `vectors.<build>.faiss`, memory-mapped when loaded. Every file is
written under a temporary name and renamed into place before `meta.json` names it; files of the previous
build are removed after the new `meta.json` is in place (a process that still has them open or mapped keeps
reading them until it reloads).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.rerank import attach, detach, open_vectors
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


def file_names(build: str, rerank: bool = False) -> dict:
    """The files of one build, as `meta.json` records them."""
    names = {"index": f"image.{build}.faiss", "ids": f"ids.{build}.parquet"}
    return {**names, "vectors": f"vectors.{build}.faiss"} if rerank else names


def vectors_workfile(out: str, build: str) -> str:
    """A local temporary path for a new float16 vectors file (published by `save`): in OUT/index for a
    local OUT, so the rename is atomic and a killed build leaves only a `.NAME.<hex>.tmp` file."""
    if not is_local(out):
        fd, path = tempfile.mkstemp(suffix=".tmp", prefix=f"vectors.{build}.")
        os.close(fd)
        return path
    folder = Path(local_path(join(out, INDEX_DIR)))
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f".vectors.{build}.faiss.{uuid.uuid4().hex[:8]}.tmp")


def _publish(local_tmp: str, url: str) -> None:
    if is_local(url):
        os.replace(local_tmp, local_path(url))
        return
    fs, path = filesystem(url)
    fs.put_file(local_tmp, path)
    os.remove(local_tmp)


def save(out: str, index: faiss.Index, ids: pa.Table, meta: dict, vectors: str | None = None) -> None:
    """Publish a build: its files first, then `meta.json`, then remove the previous build's files.

    `vectors`: the finished temporary float16 file (`vectors_workfile`) of an index re-ranked from it; only
    the base index is serialised, since the rows already are on disk.
    """
    folder = join(out, INDEX_DIR)
    previous = read_meta(out, missing_ok=True)
    base, mapped = detach(index)
    if (mapped is not None) != ("vectors" in meta["files"]) or (mapped is not None) != (vectors is not None):
        raise IndexStateError("an index re-ranked from float16 vectors is saved with its vectors file, "
                              "and only such an index")
    _write_index(join(folder, meta["files"]["index"]), base)
    if vectors is not None:
        _publish(vectors, join(folder, meta["files"]["vectors"]))
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
    if "vectors" in meta["files"]:
        index = attach(index, open_vectors(join(folder, meta["files"]["vectors"])))
    with open_read(join(folder, meta["files"]["ids"])) as f:
        ids = pq.read_table(f)
    if index.ntotal != meta["count"] or ids.num_rows != meta["count"]:
        raise IndexStateError(f"index under {folder} is inconsistent; rebuild it with `shardlight index {out}`")
    apply_tuning(index, meta.get("tuning") or {})
    return index, ids, meta
