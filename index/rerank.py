"""Exact re-rank from float16 vectors kept in a memory-mapped file beside a compressed index.

A compressed index (4-bit fast-scan PQ, SQ8, PQ) holds only its codes in RAM. Its top `k × k_factor_rf`
candidates are re-scored exactly — inner product, in float32, with the stored float16 rows — by FAISS's
`IndexRefine` over an `IndexScalarQuantizer(QT_fp16)` whose codes are the file
`OUT/index/vectors.<build>.faiss`, opened with `IO_FLAG_MMAP_IFC`: the OS pages rows in as the re-rank
touches them, so resident memory does not grow with the vectors (2·d bytes per vector, on disk).

The factory string says it the FAISS way, `…,Refine(SQfp16)`, but such an index is never one in-RAM FAISS
object: it is built as its base (`…`) while the float16 rows stream to the file (memory: one batch), and
attached to the mapped file when loaded. FAISS's in-RAM `…,RFlat` still works when asked for by name.

Invariants:
- The file is FAISS's own serialisation of an `IndexScalarQuantizer(d, QT_fp16, inner product)`: a header
  (`header()`: FAISS's bytes for an empty one, ntotal patched in), the codes' byte count, then n·d float16
  rows. FAISS reads it unchanged (checked by `open_vectors` and the tests), and row i starts at
  `data_offset(d) + 2·d·i`, so writers of disjoint row ranges can fill one file in parallel (`create` +
  `write_rows`).
- Row i of the file is FAISS id i of the base index: `attach` refuses a file whose row count differs.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache

import faiss
import numpy as np

from shardlight.core.errors import IndexStateError
from shardlight.core.storage import is_local, local_path, read_bytes

REFINE = ",Refine(SQfp16)"  # factory suffix: re-rank exactly from the memory-mapped float16 vectors
NTOTAL_AT = 8  # FAISS index header: fourcc (4 bytes), d (int32), then ntotal (int64)
COPY_ROWS = 65_536  # rows copied at once when a file is extended


def split_factory(factory: str) -> tuple[str, bool]:
    """(the base index's factory, whether it is re-ranked from the float16 file)."""
    if factory.endswith(REFINE):
        return factory[: -len(REFINE)], True
    return factory, False


def _empty(d: int) -> faiss.IndexScalarQuantizer:
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.train(np.zeros((1, d), np.float32))  # float16 needs no statistics: this only marks it trained
    return sq


@lru_cache(maxsize=8)
def _empty_bytes(d: int) -> bytes:
    data = faiss.serialize_index(_empty(d)).tobytes()
    if data[:4] != b"IxSQ" or struct.unpack_from("<iq", data, 4) != (d, 0) or data[-8:] != bytes(8):
        raise IndexStateError(f"FAISS {faiss.__version__} serialises a float16 index in an unexpected layout")
    return data


def header(d: int, n: int) -> bytes:
    """The bytes before row 0 of a file holding `n` rows of dimension `d`."""
    prefix = bytearray(_empty_bytes(d)[:-8])  # the last 8 bytes are the (empty) codes' length
    struct.pack_into("<q", prefix, NTOTAL_AT, n)
    return bytes(prefix) + struct.pack("<Q", n * d * 2)


def data_offset(d: int) -> int:
    return len(_empty_bytes(d))


class Float16Writer:
    """Streams float16 rows into a new vectors file at the local `path`; `n` rows are announced up front."""

    def __init__(self, path: str, d: int, n: int):
        self.path, self.d, self.n, self.rows = path, d, n, 0
        self.file = open(path, "wb")
        self.file.write(header(d, n))

    def write(self, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, np.float16).tobytes())
        self.rows += len(vectors)

    def copy_from(self, vectors: faiss.Index) -> None:
        """Append every row of an open vectors file (an incremental update keeps the old rows); float16 →
        float32 → float16 is exact."""
        for start in range(0, vectors.ntotal, COPY_ROWS):
            self.write(vectors.reconstruct_n(start, min(COPY_ROWS, vectors.ntotal - start)))

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.rows != self.n:
            raise IndexStateError(f"{self.path}: {self.rows} float16 rows written, {self.n} announced")


def create(path: str, d: int, n: int) -> None:
    """A vectors file of `n` rows, all zero until `write_rows` fills them (sparse on disk until then)."""
    with open(path, "wb") as f:
        f.write(header(d, n))
        f.truncate(data_offset(d) + n * d * 2)


def copy_rows(vectors: faiss.Index, path: str, first: int = 0) -> None:
    """Write every row of an open vectors file into rows `first…` of a file made by `create`."""
    for start in range(0, vectors.ntotal, COPY_ROWS):
        write_rows(path, vectors.d, first + start, vectors.reconstruct_n(start, min(COPY_ROWS, vectors.ntotal - start)))


def write_rows(path: str, d: int, first: int, vectors: np.ndarray) -> None:
    """Write rows `first…` of a file made by `create` (disjoint ranges may be written concurrently)."""
    with open(path, "r+b") as f:
        f.seek(data_offset(d) + first * d * 2)
        f.write(np.ascontiguousarray(vectors, np.float16).tobytes())


def open_vectors(url: str) -> faiss.Index:
    """The float16 vectors as a FAISS index; a local file is memory-mapped (its rows stay on disk)."""
    if is_local(url):
        index = faiss.read_index(local_path(url), faiss.IO_FLAG_MMAP_IFC)
    else:  # an object store cannot be mapped: the rows are read into RAM
        index = faiss.deserialize_index(np.frombuffer(read_bytes(url), np.uint8))
    if not _is_float16(index):
        raise IndexStateError(f"{url} is not a float16 vectors file")
    return index


def attach(base: faiss.Index, vectors: faiss.Index, k_factor: float = 1.0) -> faiss.IndexRefine:
    """`base` whose candidates are re-ranked exactly against `vectors` (row i is id i)."""
    if vectors.ntotal != base.ntotal or vectors.d != base.d:
        raise IndexStateError(f"the float16 vectors ({vectors.ntotal} × {vectors.d}) do not match the index "
                              f"({base.ntotal} × {base.d}): rebuild it")
    index = faiss.IndexRefine(base, vectors)  # FAISS's wrapper keeps both Python objects alive
    index.k_factor = k_factor
    return index


def detach(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
    """(base index, float16 vectors) of an index made by `attach`; (index, None) for any other.

    Returns the Python objects `attach` was given (FAISS keeps them in `referenced_objects`): they own the
    C++ indexes, so the parts stay valid after the combined index is dropped.
    """
    refs = getattr(index, "referenced_objects", None) or []
    if isinstance(index, faiss.IndexRefine) and len(refs) == 2 and _is_float16(refs[1]):
        return refs[0], refs[1]
    return index, None


def _is_float16(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16
