"""OUT/index on disk: `meta.json` names the current index and id-map files and is written last.

A reader therefore always sees a complete build: `image.<build>.faiss`, `ids.<build>.parquet` mapping
each FAISS id to (`shard`, `row`, `key`), and for an index re-ranked from float16 vectors
(`…,Refine(SQfp16)`, index/rerank.py) `vectors.<build>.faiss`, memory-mapped when loaded; for an index
built in parts (index/parts.py) `trained.<build>.faiss` (the trained empty index) and, unless its lists are
4-bit fast-scan ones, `lists.<build>.<hex>.ivfdata` (its inverted lists, merged on disk, read in place). Every file is
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
LISTS_SUFFIX = ".ivfdata"  # inverted lists merged on disk (index/parts.py)


def _write_index(url: str, index: faiss.Index) -> None:
    if not is_local(url):
        write_atomic(url, faiss.serialize_index(index).tobytes())
        return
    path = Path(local_path(url))  # faiss writes straight to disk: no second in-memory copy of a large index
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _read_index(url: str, mmap: bool = False) -> faiss.Index:
    """Read an index; `mmap` leaves a local IVF index's inverted lists on disk (read-only, paged in on demand).
    Lists merged on disk (`.ivfdata`) are always opened in place, from the index's own folder."""
    if not is_local(url):
        return faiss.deserialize_index(np.frombuffer(read_bytes(url), np.uint8))
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(local_path(url), flags | (faiss.IO_FLAG_MMAP if mmap else 0))


def file_names(build: str, rerank: bool = False, lists: str | None = None, parts: bool = False) -> dict:
    """The files of one build, as `meta.json` records them. An index built in parts (index/parts.py) keeps its
    trained empty index, to which later updates add their parts, and `lists` names its inverted lists when they
    were merged on disk."""
    names = {"index": f"image.{build}.faiss", "ids": f"ids.{build}.parquet"}
    if rerank:
        names["vectors"] = f"vectors.{build}.faiss"
    if parts:
        names["trained"] = f"trained.{build}.faiss"
    if lists:
        names["lists"] = lists
    return names


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


def save(out: str, index: faiss.Index, ids: pa.Table, meta: dict, ready: dict[str, str] | None = None) -> None:
    """Publish a build: its files first, then `meta.json`, then remove the previous build's files.

    `ready`: files already written to local temporary paths, by their role in `meta["files"]` (`vectors`: the
    float16 file of an index re-ranked from it, whose base alone is serialised here; `trained`), renamed (or
    uploaded) into place.
    """
    folder = join(out, INDEX_DIR)
    previous = read_meta(out, missing_ok=True)
    ready = ready or {}
    base, mapped = detach(index)
    if (mapped is not None) != ("vectors" in meta["files"]) or (mapped is not None) != ("vectors" in ready):
        raise IndexStateError("an index re-ranked from float16 vectors is saved with its vectors file, "
                              "and only such an index")
    _write_index(join(folder, meta["files"]["index"]), base)
    for role, path in ready.items():
        _publish(path, join(folder, meta["files"][role]))
    write_table(join(folder, meta["files"]["ids"]), ids)
    write_atomic(join(folder, META), json.dumps(meta, indent=2).encode())
    fs, _ = filesystem(folder)
    stale = set(previous.get("files", {}).values()) if previous else set()
    stale |= {p.rsplit("/", 1)[-1] for p in fs.glob(filesystem(join(folder, "*" + LISTS_SUFFIX))[1])}
    for name in stale - set(meta["files"].values()):  # the previous build's, and lists a killed merge left
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


def load_index(out: str, mmap: bool = False) -> tuple[faiss.Index, pa.Table, dict]:
    """The index (with its tuned search parameter applied), its id map and its metadata.

    `mmap` (for searching, not adding): a local IVF index's inverted lists stay on disk, memory-mapped, so
    resident memory does not grow with them. The float16 re-rank vectors are always mapped.
    """
    meta = read_meta(out)
    folder = join(out, INDEX_DIR)
    # lists merged on disk are mapped already; IO_FLAG_MMAP on top of them breaks FAISS 1.15's search
    index = _read_index(join(folder, meta["files"]["index"]), mmap and "lists" not in meta["files"])
    if "vectors" in meta["files"]:
        index = attach(index, open_vectors(join(folder, meta["files"]["vectors"])))
    with open_read(join(folder, meta["files"]["ids"])) as f:
        ids = pq.read_table(f)
    if index.ntotal != meta["count"] or ids.num_rows != meta["count"]:
        raise IndexStateError(f"index under {folder} is inconsistent; rebuild it with `shardlight index {out}`")
    apply_tuning(index, meta.get("tuning") or {})
    return index, ids, meta
