"""Build an IVF index in parts: train once, add groups of Parquet files to copies of the trained empty index in
any process, merge the parts into one index whose inverted lists live on disk.

    >>> from index.parts import build_in_parts
    >>> build_in_parts("out", BuildSpec(factory="auto"), part_rows=1_000_000)   # parts added one by one, here
    (flows/index_build.py runs the same steps with every part a Ray task on the run's cluster)

The steps are plain functions over picklable data, so any process can run one:
1. `prepare` (the driver): choose the index, draw the training sample spread over all files and the held-out
   tuning queries (a runner with `map_groups` reads the files for it in groups, elsewhere), train, write the
   trained empty index and (for `…,Refine(SQfp16)`) create the float16 file, and split the files into parts of
   about `part_rows` rows with their first global ids (FAISS id = row number over the files in order, exactly
   as `build_index` numbers them).
2. `add_part(job, i)` (anywhere that sees OUT's filesystem): read the trained index, add part i's vectors with
   their global ids, write the part and its id columns (temp + rename) and its rows of the float16 file; return
   the exact top-k of the tuning queries over its rows. Idempotent: a part redone after a failure or a kill
   writes the same bytes, so a retried build gives the same index.
3. `finish` (the driver, or one task the runner places elsewhere): merge the parts — into one
   `lists.<build>.<hex>.ivfdata` of on-disk inverted lists (FAISS `OnDiskInvertedLists.merge_from_multiple`,
   as `faiss.contrib.ondisk.merge_ondisk` does; the parts are read memory-mapped, so merging needs no more RAM
   than one list) or, for 4-bit fast-scan lists, whose block layout FAISS cannot merge on disk, in RAM with
   `merge_block_lists` (the codes are d/16 bytes a vector; not FAISS's `merge_from`, which overruns its
   buffers, see there) — then tune and publish atomically (index/store.py: files first, `meta.json` last),
   keeping the trained empty index.

Updates of an index built in parts add parts too, merged after the index's own lists into a fresh copy of the
trained index (index/update.py).

Invariants: the same ids, lists and answers as `build_index` over the same files with the same trained
quantizer (tested); the previous index serves until `meta.json` names the new files; a killed build leaves only
its work folder `OUT/index/.parts.<build>.<hex>.tmp` (removed by the next run) and at most an `.ivfdata` no
`meta.json` names (removed by the next publish). OUT must be a filesystem every process mounts.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.build import BuildSpec, Trained, build_index, publish, train_new
from index.rerank import attach, create, open_vectors, write_rows
from index.store import INDEX_DIR, LISTS_SUFFIX
from index.tune import ExactTopK
from index.vectors import fingerprint, iter_vectors, num_rows
from shardlight.core.errors import IndexStateError
from shardlight.core.storage import is_local, join, local_path

log = logging.getLogger("shardlight")

PART_ROWS = 1_000_000  # rows per part by default: ~2 GB of float32 read per task at 512-d, minutes on one core


@dataclass
class Part:
    number: int
    files: list[str]
    first: int  # global FAISS id of its first row
    rows: int


@dataclass
class PartsJob:
    """What every part task needs, as plain data (pickled to Ray tasks)."""

    work: str  # local folder of this build's temporary files
    dim: int
    trained: str  # the trained empty index (a FAISS file)
    vectors: str | None  # the float16 file the parts fill (index/rerank.py), or None
    parts: list[Part]
    queries: np.ndarray
    query_ids: np.ndarray
    k: int

    def part_path(self, number: int) -> str:
        return os.path.join(self.work, f"part-{number:05d}.faiss")

    def ids_path(self, number: int) -> str:
        return os.path.join(self.work, f"part-{number:05d}.ids.parquet")


Runner = Callable[[PartsJob, list[int]], list[dict]]  # runs add_part for the given part numbers, returns results


def sequential(job: PartsJob, numbers: list[int]) -> list[dict]:
    """Add the parts one after another in this process."""
    return [add_part(job, n) for n in numbers]


def split(files: list[str], part_rows: int, first: int = 0) -> list[Part]:
    """Consecutive files grouped into parts of at least `part_rows` rows (the last may be smaller)."""
    parts: list[Part] = []
    group, rows = [], 0
    for url in files:
        group.append(url)
        rows += num_rows(url)
        if rows >= part_rows:
            parts.append(Part(len(parts), group, first, rows))
            first, group, rows = first + rows, [], 0
    if group:
        parts.append(Part(len(parts), group, first, rows))
    return parts


def _check_local(out: str) -> None:
    if not is_local(out):
        raise IndexStateError(f"building the index in parts needs OUT on a filesystem every worker mounts, not {out}: "
                              "build it in one process (`shardlight index OUT` without parts)")


def work_folder(out: str, build: str) -> str:
    _check_local(out)
    folder = Path(local_path(join(out, INDEX_DIR))) / f".parts.{build}.{uuid.uuid4().hex[:8]}.tmp"
    folder.mkdir(parents=True)
    return str(folder)


@contextmanager
def cleaned_up(folder: str):
    """Remove the work folder when the block ends, whatever happened (a killed process leaves it as
    `.parts.….tmp`, which the next run's `remove_temporary` deletes)."""
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(out: str, spec: BuildSpec, part_rows: int = PART_ROWS,
            runner: Runner | None = None) -> tuple[PartsJob | None, Trained]:
    """Train once and lay out the parts (the driver's first step); no job for an index without inverted lists
    (`Flat`, `HNSW`: auto's choice for small sets), which is built in one process. A `runner` that offers
    `map_groups` and `width` (flows/index_build.py: RayRunner) also reads the sample pass, `width` groups of
    files at once."""
    _check_local(out)
    mapper = getattr(runner, "map_groups", None)
    t = train_new(out, spec, on_disk=True, map_groups=mapper, groups=runner.width if mapper else 1)
    if not _has_lists(t.index):
        return None, t
    work = work_folder(out, fingerprint(t.files))
    trained = os.path.join(work, "trained.faiss")
    faiss.write_index(t.index, trained)
    vectors = os.path.join(work, "vectors.faiss") if t.reranked else None
    if vectors:
        create(vectors, t.dim, t.total)
    job = PartsJob(work, t.dim, trained, vectors, split(t.files, part_rows), t.queries, t.query_ids, t.k)
    return job, t


def add_part(job: PartsJob, number: int) -> dict:
    """Add part `number`'s vectors to a copy of the trained index with their global ids and write it."""
    start = time.perf_counter()
    part = job.parts[number]
    index = faiss.read_index(job.trained)
    exact = ExactTopK(job.queries, job.query_ids, job.k)
    tables, first = [], part.first
    for batch, ids in iter_vectors(part.files):
        index.add_with_ids(batch, np.arange(first, first + len(batch), dtype=np.int64))
        exact.update(batch, first)
        if job.vectors:
            write_rows(job.vectors, job.dim, first, batch)
        first += len(batch)
        tables.append(ids)
    if first - part.first != part.rows:
        raise IndexStateError(f"part {number}: {first - part.first} rows read, {part.rows} planned (a file changed)")
    _replace(job.part_path(number), lambda tmp: faiss.write_index(index, tmp))
    _replace(job.ids_path(number), lambda tmp: pq.write_table(pa.concat_tables(tables), tmp))
    return {"number": number, "rows": part.rows, "scores": exact.scores, "ids": exact.ids,
            "seconds": round(time.perf_counter() - start, 3)}


def _replace(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    write(tmp)
    os.replace(tmp, path)


def merge(job: PartsJob, into: faiss.Index, numbers: list[int], folder: str, build: str,
          before: faiss.Index | None = None) -> tuple[faiss.Index, str | None]:
    """(`into` filled with the parts' lists, the name of its `.ivfdata` or None when merged in RAM).

    `before`: an index whose lists come first (an update merges the served index's lists with the new parts').
    """
    ivf = faiss.extract_index_ivf(into)
    earlier = [before] if before is not None else []
    if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):  # block-packed lists: merged in RAM only
        parts = (faiss.read_index(job.part_path(n)) for n in numbers)  # one part in memory at a time
        merge_block_lists(into, [*earlier, *parts])
        return into, None
    name = f"lists.{build}.{uuid.uuid4().hex[:8]}{LISTS_SUFFIX}"
    sources = earlier + [faiss.read_index(job.part_path(n), faiss.IO_FLAG_MMAP) for n in numbers]  # lists stay on disk
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.join(folder, name))
    pointers = faiss.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(faiss.extract_index_ivf(source).invlists)
    total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns the lists now
    into.ntotal = ivf.ntotal = total
    return into, name


def merge_block_lists(into: faiss.Index, sources: Iterable[faiss.Index]) -> None:
    """Append every list of each fast-scan index in `sources` (in order) to the same list of `into`, which must
    be empty; `into.ntotal` becomes their sum. `sources` may be a generator: one source is read at a time, and
    the codes gathered so far (the merged index's size again) are held until the lists are packed.

    Not FAISS's `merge_from`: in FAISS 1.15 `BlockInvertedLists::add_entries` tests a list's entry count
    against the block's size in bytes and then copies whole blocks past the end of the list's buffer, so a merge
    corrupts the heap as soon as a list already holds a positive multiple of `block_size` entries (1,024 at
    PQ64x4fs: 5M vectors in 2,048 lists crashed; smaller builds passed by luck). Here each list's codes are
    unpacked from every source, concatenated, packed again into whole blocks and added once to the empty list,
    the one case that function copies correctly.
    """
    ivf = faiss.downcast_index(faiss.extract_index_ivf(into))
    if ivf.ntotal:
        raise IndexStateError("merging fast-scan lists needs an empty index to merge into")
    packer = ivf.get_CodePacker()
    per_block, block_bytes = packer.nvec, packer.block_size
    gathered: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    total = 0
    for source in sources:
        total += source.ntotal
        lists = faiss.extract_index_ivf(source).invlists
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
                packed = faiss.rev_swig_ptr(lists.get_codes(number), -(-size // per_block) * block_bytes)
                gathered.setdefault(number, []).append((ids, _unpack(packer, packed, size)))
    dest = faiss.downcast_InvertedLists(ivf.invlists)
    for number in sorted(gathered):
        ids = np.concatenate([i for i, _ in gathered[number]])
        packed = _pack(packer, np.concatenate([c for _, c in gathered.pop(number)]))
        dest.add_entries(number, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(packed))
    into.ntotal = ivf.ntotal = total


def _unpack(packer, packed: np.ndarray, size: int) -> np.ndarray:
    """`size` flat codes (rows of `packer.code_size` bytes) out of whole blocks."""
    blocks = -(-size // packer.nvec)
    flat = np.empty((blocks * packer.nvec, packer.code_size), np.uint8)
    for b in range(blocks):
        packer.unpack_all(faiss.swig_ptr(packed[b * packer.block_size:]), faiss.swig_ptr(flat[b * packer.nvec:]))
    return flat[:size]


def _pack(packer, flat: np.ndarray) -> np.ndarray:
    """Flat codes packed into whole blocks (the last one padded with zero codes)."""
    blocks = -(-len(flat) // packer.nvec)
    padded = np.zeros((blocks * packer.nvec, packer.code_size), np.uint8)
    padded[: len(flat)] = flat
    packed = np.empty(blocks * packer.block_size, np.uint8)
    for b in range(blocks):
        packer.pack_all(faiss.swig_ptr(padded[b * packer.nvec:]), faiss.swig_ptr(packed[b * packer.block_size:]))
    return packed


def finish(out: str, spec: BuildSpec, job: PartsJob, t: Trained, results: list[dict], add_s: float) -> dict:
    """Merge the parts, tune, publish (the last step, in any process that sees OUT's filesystem; it reads the
    trained index from `job.trained`, not `t.index`); returns the index metadata."""
    exact = collect(job, results)
    folder = local_path(join(out, INDEX_DIR))
    index, lists = merge(job, faiss.read_index(job.trained), [p.number for p in job.parts], folder, fingerprint(t.files))
    ids = pa.concat_tables([pq.read_table(job.ids_path(p.number)) for p in job.parts])
    index = attach(index, open_vectors(job.vectors)) if job.vectors else index
    parts = {"count": len(job.parts), "seconds": [r["seconds"] for r in sorted(results, key=_number)],
             "merged": "on disk" if lists else "in RAM"}
    return publish(out, spec, t, index, ids, exact.ids, add_s, job.vectors, lists, job.trained, {"parts": parts})


def collect(job: PartsJob, results: list[dict]) -> ExactTopK:
    """The exact top-k of the tuning queries over all parts; every part must have reported."""
    done = sorted(r["number"] for r in results)
    if done != [p.number for p in job.parts]:
        raise IndexStateError(f"parts missing from the build: {sorted(set(p.number for p in job.parts) - set(done))}")
    exact = ExactTopK(job.queries, job.query_ids, job.k)
    for r in results:
        exact.merge(r["scores"], r["ids"])
    return exact


def build_in_parts(out: str, spec: BuildSpec, part_rows: int = PART_ROWS, runner: Runner = sequential) -> dict:
    """Build OUT's index in parts: `runner` adds them (in this process by default; Ray tasks in flows/). A
    `runner` that offers `finish` (flows/index_build.py: RayRunner) also merges, tunes and publishes elsewhere,
    so this process never maps the index's files: tuning's re-rank reads scattered rows of the float16 file,
    and the pages it maps count in the resident memory of whichever process runs it."""
    job, t = prepare(out, spec, part_rows, runner)
    if job is None:
        log.info("%s has no inverted lists to build in parts: building it in one process", t.plan.factory)
        return build_index(out, **asdict(spec))
    with cleaned_up(job.work):
        start = time.perf_counter()
        results = runner(job, [p.number for p in job.parts])
        last_step = getattr(runner, "finish", finish)
        return last_step(out, spec, job, replace(t, index=None), results, time.perf_counter() - start)


def in_parts(out: str, factory: str) -> bool:
    """Whether an index of `factory` over OUT can be built in parts: IVF (auto: whatever it chooses) on a local
    filesystem. Flat and HNSW indexes are built in one process."""
    return is_local(out) and (factory == "auto" or "IVF" in factory.upper())


def _has_lists(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _number(result: dict) -> int:
    return result["number"]
