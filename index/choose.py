"""Pick a FAISS index type from the number of vectors, their dimension and a memory budget.

The rules follow autofaiss (IVF with about 4·√n lists, an HNSW coarse quantizer for very many lists,
OPQ+PQ when memory demands compression) with changes that the measured recall/queries-per-second curves
(bench/index_bench.py, docs/benchmarks.md) call for at this project's scale:

- exact `Flat` is kept while one exact query stays cheap (a few ms), since it needs no training,
  no tuning and gives exact answers;
- above that, `IVF…,PQ{d/8}x4fs,Refine(SQfp16)`: inverted lists of 4-bit fast-scan PQ codes (a SIMD scan
  over 32 bytes per 512-d vector, not 2 KiB) over about √n lists, whose top `k × r` candidates are
  re-ranked exactly against the vectors kept as float16 in a memory-mapped file beside the index
  (index/rerank.py). Batch search over IVF,Flat is memory-bound (every probed vector is 2 KiB read from
  RAM); the fast-scan codes are 64× smaller and the re-rank touches only `k × r` rows, so at the same recall
  it answers several times more queries/s. Only the codes, centroids and ids count against the memory
  budget: the float16 rows (2·d bytes per vector) stay on disk and the OS pages in the ones re-ranked;
- dimensions that do not split into an even number of 8-dimension codes: `IVF…,Flat` when the float vectors
  fit the budget, else 8-bit scalar quantisation (`IVF…,SQ8`, 4× smaller) and only then `OPQ/IVF/PQ`, both
  re-ranked from the float16 file as well (PQ alone tops out well below recall 0.95).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from index.rerank import REFINE
from shardlight.core.errors import IndexStateError

FLAT_MAX_CELLS = 32_000_000  # n·dim up to which exact search stays ~5 ms per query on 2 cores (62.5k × 512)
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per k-means centroid
HNSW_QUANTIZER_LISTS = 16_384  # from here on, assign to lists with an HNSW graph instead of a flat scan
PQ_SIZES = (256, 128, 64, 32, 16, 8)  # bytes per vector tried for PQ, largest (best recall) first
FAST_SCAN_DIMS_PER_CODE = 8  # 4-bit fast-scan PQ with one 4-bit code per 8 dimensions (64 codes at 512-d)
# Lists for the fast-scan index: about √n, not 4·√n. Scanning a code costs ~1/64 of a float vector, so the
# coarse quantizer (nlist·d per query) dominates and fewer, longer lists are faster at the same recall.
FAST_SCAN_LISTS_PER_ROOT = 1
HNSW_LINK_BYTES = 32 * 2 * 4 + 16  # an HNSW32 node's links (two levels' worth, int32) and level data, roughly


@dataclass
class IndexPlan:
    factory: str  # FAISS index_factory string
    reason: str  # why this type, in one line (recorded in meta.json)
    bytes_estimate: int  # memory (RAM) the populated index needs
    tune: str | None  # search parameter to tune: nprobe, efSearch, or None (exact); with a re-rank
    # (`…,Refine(SQfp16)`, `…,RFlat`) its depth k_factor_rf is tuned alongside it (index/tune.py)
    mapped_bytes: int = 0  # on disk and memory-mapped, not RAM: the float16 re-rank rows (and lists merged on disk)

    def to_dict(self) -> dict:
        return asdict(self)


def default_memory_budget() -> int:
    """Half of this machine's physical memory: the index must leave room for the server and the OS."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def num_lists(n: int, per_root: float = 4) -> int:
    """A power of two near `per_root`·√n, with enough points per list to train k-means."""
    target = per_root * n ** 0.5
    nlist = 1 << max(0, round(target).bit_length() - 1)
    if nlist * 1.5 < target:
        nlist *= 2
    while nlist > 1 and n / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return max(1, nlist)


def _ivf(nlist: int) -> str:
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"


def choose_index(n: int, dim: int, memory_budget: int | None = None, on_disk: bool = False) -> IndexPlan:
    """The index type for `n` vectors of `dim` floats that fits `memory_budget` bytes of RAM.

    `on_disk`: the index is built in parts and its inverted lists merged on disk and memory-mapped
    (index/parts.py), so when even the fast-scan codes do not fit, RAM need only hold the coarse quantizer.
    """
    budget = memory_budget or default_memory_budget()
    flat_bytes = n * dim * 4
    if n * dim <= FLAT_MAX_CELLS and flat_bytes <= budget:
        return IndexPlan("Flat", f"{n} vectors: exact search is fast enough", flat_bytes, None)
    nlist = num_lists(n)
    ivf = _ivf(nlist)
    overhead = nlist * dim * 4 + n * 8  # centroids + stored ids
    mapped = n * dim * 2  # the float16 rows re-ranked from disk
    codes, fs_lists = fast_scan_codes(dim), num_lists(n, FAST_SCAN_LISTS_PER_ROOT)
    fast_scan_bytes = n * codes // 2 + fs_lists * dim * 4 + n * 8  # 4-bit codes + centroids + ids
    if codes and fast_scan_bytes <= budget:
        return IndexPlan(f"{_ivf(fs_lists)},PQ{codes}x4fs{REFINE}", f"{n} vectors: 4-bit fast-scan inverted lists "
                         "in RAM, re-ranked exactly from float16 vectors memory-mapped from disk",
                         fast_scan_bytes, "nprobe", mapped)
    if on_disk:
        return _on_disk_plan(n, dim, nlist, budget, mapped)
    if flat_bytes + overhead <= budget:
        return IndexPlan(f"{ivf},Flat", f"{n} vectors: inverted lists over uncompressed vectors fit the budget",
                         flat_bytes + overhead, "nprobe")
    sq_bytes = n * dim + overhead
    if sq_bytes <= budget:
        return IndexPlan(f"{ivf},SQ8{REFINE}", f"uncompressed needs {_gib(flat_bytes)}, over the {_gib(budget)} "
                         "budget: 8-bit scalar quantisation, re-ranked from memory-mapped float16 vectors",
                         sq_bytes, "nprobe", mapped)
    for m in PQ_SIZES:
        if dim % m or m > dim // 2:
            continue
        pq_bytes = n * m + overhead + dim * dim * 4
        if pq_bytes <= budget:
            return IndexPlan(f"OPQ{m},{ivf},PQ{m}{REFINE}", f"{_gib(sq_bytes)} even at 8 bits per dimension is over "
                             f"the {_gib(budget)} budget: product quantisation, {m} bytes per vector, re-ranked from "
                             "memory-mapped float16 vectors", pq_bytes, "nprobe", mapped)
    raise IndexStateError(f"{n} vectors of dimension {dim} cannot fit a {_gib(budget)} memory budget "
                          "(even 8-byte PQ codes do not); raise the budget or shard the index")


def _on_disk_plan(n: int, dim: int, nlist: int, budget: int, mapped: int) -> IndexPlan:
    """8-bit PQ (`d/8` bytes a vector, SQ8 when `d` does not split) in lists merged on disk, re-ranked from float16:
    RAM holds the coarse quantizer (centroids, and its HNSW graph from 16,384 lists on)."""
    ivf = _ivf(nlist)
    codec, code_bytes = (f"PQ{dim // 8}", dim // 8) if dim % 8 == 0 else ("SQ8", dim)
    ram = nlist * dim * 4 + (nlist * HNSW_LINK_BYTES if nlist >= HNSW_QUANTIZER_LISTS else 0)
    if ram > budget:
        raise IndexStateError(f"the coarse quantizer of {n} vectors ({_gib(ram)}) does not fit a {_gib(budget)} "
                              "memory budget; raise the budget or shard the index")
    lists = n * (code_bytes + 8)
    return IndexPlan(f"{ivf},{codec}{REFINE}", f"{n} vectors: the fast-scan codes exceed the {_gib(budget)} budget; "
                     f"{code_bytes}-byte codes in inverted lists merged on disk ({_gib(lists)}), re-ranked from "
                     "memory-mapped float16 vectors", ram, "nprobe", mapped + lists)


def fast_scan_codes(dim: int) -> int:
    """Number of 4-bit PQ codes per vector for the fast-scan index (0: the dimension does not split evenly)."""
    m = dim // FAST_SCAN_DIMS_PER_CODE
    return m if m >= 2 and m % 2 == 0 and m * FAST_SCAN_DIMS_PER_CODE == dim else 0


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
