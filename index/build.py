"""Build a FAISS inner-product index over the image embeddings, streaming over the Parquet files.

    >>> from index.build import build_index
    >>> build_index("out", factory="auto")          # type chosen from size and memory, nprobe tuned
    >>> build_index("out", factory="IVF1024,Flat")  # an explicit FAISS factory string

Two passes over OUT/embeddings: one draws the training sample and held-out queries, one adds every
vector in batches while computing the queries' exact neighbours. Memory is the index itself plus one
batch; an index re-ranked from float16 vectors (`…,Refine(SQfp16)`, index/rerank.py) streams them to a
file beside it instead of holding them. The index is derived data: it can always be rebuilt from Parquet
(see index/store.py).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import faiss
import numpy as np
import pyarrow as pa

from index.choose import IndexPlan, choose_index, tune_parameter
from index.rerank import Float16Writer, attach, open_vectors, split_factory
from index.store import (  # noqa: F401  (INDEX_DIR, META, load_index: re-exported)
    INDEX_DIR,
    META,
    file_names,
    includes_synthetic,
    load_index,
    read_meta,
    save,
    vectors_workfile,
)
from index.tune import ExactTopK, tune
from index.vectors import (  # noqa: F401  (embedding_files, fingerprint: re-exported for flows/)
    Mapper,
    dimension,
    embedding_files,
    file_name,
    fingerprint,
    index_files,
    iter_vectors,
    num_rows,
    sample,
    signature,
)
from shardlight.core.errors import IndexStateError, first_line, last_line
from shardlight.core.storage import join

log = logging.getLogger("shardlight")

RECALL_K = 10  # recall@10 is the tuning target's measure


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # a CUDA build without a usable driver
        return 0


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty index for `factory`; for `…,Refine(SQfp16)` its base (the float16 rows live in a file)."""
    try:
        index = faiss.index_factory(dim, split_factory(factory)[0], faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexStateError(f"bad FAISS factory string {factory!r}: {last_line(err)}") from None
    ivf = _ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # The factory turns on polysemous training for `…,PQm`: an annealing of each sub-quantizer's 256 codes that
        # only serves searches with a Hamming threshold (`polysemous_ht`), which shardlight never sets; at PQ64 it
        # is most of the training time (docs/scale.md). The codes it would produce search the same without it.
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def train(index: faiss.Index, vectors: np.ndarray) -> None:
    """Train quantizers; k-means runs on the GPU when there is one (the add stays on the CPU)."""
    if index.is_trained:
        return
    ivf = _ivf(index)
    if ivf is not None and gpu_count() > 0:
        try:
            flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
            log.info("training the coarse quantizer on %d GPU(s)", gpu_count())
        except RuntimeError as err:  # GPU FAISS present but unusable: the CPU path always works
            log.warning("GPU training unavailable (%s); training on CPU", first_line(err))
    if len(vectors) == 0:
        raise IndexStateError("no vectors to train the index on")
    try:
        index.train(vectors)
    except RuntimeError as err:
        raise _training_error(err, len(vectors)) from None
    if ivf is not None:
        ivf.clustering_index = None


def _training_error(err: RuntimeError, n: int) -> IndexStateError:
    """FAISS's C++ assertion as one line saying how many vectors the quantizer needs and what to do instead."""
    needed = re.search(r"number of clusters \((\d+)\)", str(err))
    if not needed:
        return IndexStateError(f"training the index failed: {last_line(err)}")
    k = int(needed.group(1))
    return IndexStateError(f"this index type needs at least {k} vectors to train ({39 * k} recommended) and there "
                           f"are {n}: use fewer IVF lists (IVF{max(1, n // 39)}), fewer PQ bits, --factory Flat or "
                           "--factory auto")


def quantization_error(index: faiss.Index, vectors: np.ndarray) -> dict:
    """Mean squared distance to the assigned IVF centroid, and the codec's reconstruction error."""
    if len(vectors) == 0:
        return {"coarse": 0.0, "codec": 0.0}
    codec = float(((vectors - index.sa_decode(index.sa_encode(vectors))) ** 2).sum(1).mean()) \
        if _supports_codec(index) else 0.0
    ivf = _ivf(index)
    if ivf is None:
        return {"coarse": 0.0, "codec": round(codec, 6)}
    x = vectors
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    _, assigned = ivf.quantizer.search(x, 1)
    centroids = ivf.quantizer.reconstruct_batch(assigned[:, 0])
    coarse = float(((x - centroids) ** 2).sum(1).mean())
    return {"coarse": round(coarse, 6), "codec": round(codec, 6)}


def _supports_codec(index: faiss.Index) -> bool:
    try:
        index.sa_code_size()
        return True
    except RuntimeError:
        return False


def _plan(factory: str, n: int, dim: int, memory_budget: int | None, on_disk: bool = False) -> IndexPlan:
    if factory == "auto":
        return choose_index(n, dim, memory_budget, on_disk)
    return IndexPlan(factory, "given", 0, tune_parameter(factory))


@dataclass
class BuildSpec:
    """How to build: `build_index`'s arguments, as plain data a parallel build hands to its tasks."""

    factory: str = "Flat"
    train_sample: int = 100_000
    nprobe: int | None = None
    model: dict | None = None
    memory_budget: int | None = None
    recall_target: float = 0.95
    tune_queries: int = 500
    seed: int = 0
    synthetic: bool = True


@dataclass
class Trained:
    """A trained, empty index for a set of files, and the held-out queries that will tune it."""

    plan: IndexPlan
    index: faiss.Index | None  # the base index (without the float16 re-rank, attached once filled); None once
    #   handed to index/parts.py's `finish`, which reads the trained index from its file
    files: list[str]
    dim: int
    total: int
    queries: np.ndarray
    query_ids: np.ndarray
    seconds: float

    @property
    def reranked(self) -> bool:
        return split_factory(self.plan.factory)[1]

    @property
    def k(self) -> int:
        return min(RECALL_K, max(1, self.total - 1))


def build_index(out: str, factory: str = "Flat", train_sample: int = 100_000, nprobe: int | None = None,
                model: dict | None = None, *, memory_budget: int | None = None, recall_target: float = 0.95,
                tune_queries: int = 500, seed: int = 0, synthetic: bool = True) -> dict:
    """Build (or rebuild) OUT/index from OUT/embeddings (and OUT/augmented) and return its metadata.

    Args:
        out: the run's output folder or URL.
        factory: a FAISS index_factory string, or "auto" to choose from size and `memory_budget`.
        train_sample: vectors sampled to train quantizers (raised to what the IVF lists need).
        nprobe: a fixed search breadth (nprobe, or efSearch for HNSW) instead of tuning one.
        model: the CLIP spec that embedded the vectors, recorded for the searcher.
        memory_budget: bytes the populated index may use in RAM (default: half the machine's memory).
        recall_target: recall@10 vs exact search that tuning aims for.
        tune_queries: held-out query vectors used to measure recall and latency.
        seed: seed of the query sample.
        synthetic: also index the generated rows (OUT/augmented); False indexes the input rows only.
    """
    spec = BuildSpec(factory, train_sample, nprobe, model, memory_budget, recall_target, tune_queries, seed, synthetic)
    t = train_new(out, spec)
    exact = ExactTopK(t.queries, t.query_ids, t.k)
    vectors = vectors_workfile(out, fingerprint(t.files)) if t.reranked else None
    with removed_on_error(vectors):
        added = time.perf_counter()
        ids = add_all(t.index, t.files, exact, Float16Writer(vectors, t.dim, t.total) if vectors else None)
        index = attach(t.index, open_vectors(vectors)) if vectors else t.index
        return publish(out, spec, t, index, ids, exact.ids, time.perf_counter() - added, vectors)


def train_new(out: str, spec: BuildSpec, on_disk: bool = False, map_groups: Mapper | None = None,
              groups: int = 1) -> Trained:
    """Choose the index for OUT's files, draw the training sample (spread evenly over all rows) and the held-out
    tuning queries in one pass, and train. `on_disk`: its lists will be merged on disk (index/parts.py).
    `map_groups`, `groups`: the sample pass read in that many groups of files elsewhere (`vectors.sample`)."""
    files = index_files(out, spec.synthetic)
    if not embedding_files(out):
        raise IndexStateError(f"no embeddings under {join(out, 'embeddings')}: run `shardlight run` first")
    start = time.perf_counter()
    dim, total = dimension(files), sum(num_rows(u) for u in files)
    plan = _plan(spec.factory, total, dim, spec.memory_budget, on_disk)
    index = new_index(dim, plan.factory)
    ivf = _ivf(index)
    wanted = spec.train_sample
    if ivf is not None and spec.factory == "auto":
        wanted = max(spec.train_sample, min(total, ivf.nlist * 39))
    train_x, queries, query_ids = sample(files, 0 if index.is_trained else wanted, spec.tune_queries, spec.seed,
                                         map_groups, groups)
    train(index, train_x)
    return Trained(plan, index, files, dim, total, queries, query_ids, time.perf_counter() - start)


def publish(out: str, spec: BuildSpec, t: Trained, index: faiss.Index, ids: pa.Table, truth: np.ndarray,
            add_s: float, vectors: str | None = None, lists: str | None = None, trained: str | None = None,
            extra: dict | None = None) -> dict:
    """Tune the filled `index` on the held-out queries (`truth`: their exact top-k), describe it and save it
    (index/store.py: files first, `meta.json` last). `vectors`, `trained`: finished temporary files to publish
    with it; `lists`: the file name of its inverted lists merged on disk; `extra`: more entries for `meta.json`."""
    start = time.perf_counter()
    tuning = tune(index, t.plan.tune, t.queries, t.query_ids, truth, spec.recall_target, fixed=spec.nprobe)
    if tuning["param"] and not tuning.get("reached"):
        log.warning("index %s reaches recall@%d %.3f, below the %.2f target", t.plan.factory, RECALL_K,
                    tuning["recall_at_k"], spec.recall_target)
    meta = _meta(t.files, index, t.plan, spec.factory, t.dim, spec.model, tuning, quantization_error(index, t.queries))
    meta["files"] = file_names(meta["fingerprint"], t.reranked, lists, parts=trained is not None)
    meta["synthetic"] = spec.synthetic
    meta["timings"] = {"train_s": round(t.seconds, 3), "add_s": round(add_s, 3),
                       "tune_s": round(time.perf_counter() - start, 3)}
    meta["build_seconds"] = round(t.seconds + add_s + time.perf_counter() - start, 3)
    meta |= extra or {}
    save(out, index, ids, meta, {role: path for role, path in (("vectors", vectors), ("trained", trained)) if path})
    return meta


@contextmanager
def removed_on_error(path: str | None):
    """Delete the temporary file `path` when the block fails (a killed process leaves it as `.NAME.<hex>.tmp`,
    which the next run removes)."""
    try:
        yield
    except BaseException:
        if path and os.path.exists(path):
            os.remove(path)
        raise


def add_all(index: faiss.Index, files: list[str], exact: ExactTopK | None = None,
            vectors: Float16Writer | None = None) -> pa.Table:
    """Add every vector of `files` (ids in file order, continuing from `index.ntotal`), also streaming them to
    the float16 `vectors` file and the running `exact` top-k when given; returns the id columns added."""
    id_tables, first = [], int(index.ntotal)
    for batch, ids in iter_vectors(files):
        index.add(batch)
        if exact is not None:
            exact.update(batch, first)
        if vectors is not None:
            vectors.write(batch)
        first += len(batch)
        id_tables.append(ids)
    if vectors is not None:
        vectors.close()
    return pa.concat_tables(id_tables)


def is_current(out: str, factory: str | None = None, synthetic: bool | None = None) -> bool:
    """Whether OUT/index covers exactly the current Parquet files (and was asked for as `factory`, with or
    without generated rows as `synthetic` says; None: as it was built)."""
    meta = read_meta(out, missing_ok=True)
    if not meta or (synthetic is not None and synthetic != includes_synthetic(meta)):
        return False
    if meta.get("fingerprint") != fingerprint(index_files(out, includes_synthetic(meta))):
        return False
    return factory is None or factory in (meta.get("requested_factory"), meta.get("factory"))


def _meta(files: list[str], index: faiss.Index, plan: IndexPlan, requested: str, dim: int, model: dict | None,
          tuning: dict, error: dict) -> dict:
    build = fingerprint(files)
    return {
        "count": int(index.ntotal), "dim": dim, "factory": plan.factory, "requested_factory": requested,
        "choice": plan.to_dict(), "metric": "inner_product", "nprobe": tuning.get("value"),
        "tuning": tuning, "quantization_error": error, "model": model or {}, "fingerprint": build,
        "shards": len(files), "inputs": [signature(u) for u in files],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
