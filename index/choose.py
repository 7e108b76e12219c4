"""Pick a FAISS index type from the number of vectors, their dimension and a memory budget.

The rules follow autofaiss (IVF with about 4·√n lists, an HNSW coarse quantizer for very many lists,
OPQ+PQ when memory demands compression) with two changes that matter at this project's scale:

- compression is a last resort: uncompressed `IVF…,Flat` first, then 8-bit scalar quantisation
  (`IVF…,SQ8`: 4× smaller, recall within a point of Flat), and only then `OPQ/IVF/PQ`, whose recall
  against exact search tops out well below 0.95 without re-ranking;
- exact `Flat` is kept while one exact query stays cheap (a few ms), since it needs no training,
  no tuning and gives exact answers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from shardlight.core.errors import IndexStateError

FLAT_MAX_CELLS = 32_000_000  # n·dim up to which exact search stays ~5 ms per query on 2 cores (62.5k × 512)
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per k-means centroid
HNSW_QUANTIZER_LISTS = 16_384  # from here on, assign to lists with an HNSW graph instead of a flat scan
PQ_SIZES = (256, 128, 64, 32, 16, 8)  # bytes per vector tried for PQ, largest (best recall) first


@dataclass
class IndexPlan:
    factory: str  # FAISS index_factory string
    reason: str  # why this type, in one line (recorded in meta.json)
    bytes_estimate: int  # memory the populated index needs
    tune: str | None  # search parameter to tune: nprobe, efSearch, or None (exact)

    def to_dict(self) -> dict:
        return asdict(self)


def default_memory_budget() -> int:
    """Half of this machine's physical memory: the index must leave room for the server and the OS."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def num_lists(n: int) -> int:
    """A power of two near 4·√n, with enough points per list to train k-means."""
    target = 4 * n ** 0.5
    nlist = 1 << max(0, round(target).bit_length() - 1)
    if nlist * 1.5 < target:
        nlist *= 2
    while nlist > 1 and n / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return max(1, nlist)


def _ivf(nlist: int) -> str:
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"


def choose_index(n: int, dim: int, memory_budget: int | None = None) -> IndexPlan:
    """The index type for `n` vectors of `dim` floats that fits `memory_budget` bytes."""
    budget = memory_budget or default_memory_budget()
    flat_bytes = n * dim * 4
    if n * dim <= FLAT_MAX_CELLS and flat_bytes <= budget:
        return IndexPlan("Flat", f"{n} vectors: exact search is fast enough", flat_bytes, None)
    nlist = num_lists(n)
    ivf = _ivf(nlist)
    overhead = nlist * dim * 4 + n * 8  # centroids + stored ids
    if flat_bytes + overhead <= budget:
        return IndexPlan(f"{ivf},Flat", f"{n} vectors: inverted lists over uncompressed vectors fit the budget",
                         flat_bytes + overhead, "nprobe")
    sq_bytes = n * dim + overhead
    if sq_bytes <= budget:
        return IndexPlan(f"{ivf},SQ8", f"uncompressed needs {_gib(flat_bytes)}, over the {_gib(budget)} budget: "
                         "8-bit scalar quantisation", sq_bytes, "nprobe")
    for m in PQ_SIZES:
        if dim % m or m > dim // 2:
            continue
        pq_bytes = n * m + overhead + dim * dim * 4
        if pq_bytes <= budget:
            return IndexPlan(f"OPQ{m},{ivf},PQ{m}", f"{_gib(sq_bytes)} even at 8 bits per dimension is over the "
                             f"{_gib(budget)} budget: product quantisation, {m} bytes per vector", pq_bytes, "nprobe")
    raise IndexStateError(f"{n} vectors of dimension {dim} cannot fit a {_gib(budget)} memory budget "
                          "(even 8-byte PQ codes do not); raise the budget or shard the index")


def tune_parameter(factory: str) -> str | None:
    """The search parameter trading speed for recall in an index built from `factory`."""
    parts = factory.upper()
    if "IVF" in parts:
        return "nprobe"
    if "HNSW" in parts:
        return "efSearch"
    return None


def _gib(n: int) -> str:
    """Bytes in the largest unit that keeps a number ≥ 1: `1.50 GiB`, `58.6 KiB`."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"
