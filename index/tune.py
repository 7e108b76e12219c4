"""Measure recall@k against exact search and tune `nprobe`/`efSearch` (and the re-rank depth) to reach a
recall target.

Queries are vectors sampled from the data set; each query's own row is left out of both the exact and
the approximate answer, so a query never "finds itself" and recall is that of a held-out query.

An index with an exact re-rank step (FAISS `IndexRefine`, which re-scores the top `k × k_factor_rf`
candidates of the compressed index against stored vectors: float16 ones memory-mapped from disk for
`…,Refine(SQfp16)`, index/rerank.py, or float32 ones in RAM for `…,RFlat`) has two knobs. For
each re-rank depth the smallest search breadth that reaches the target is found, and the pair with the
most queries/s wins; `meta.json` records both under `tuning.params`.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

CANDIDATES = {
    "nprobe": (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096),
    "efSearch": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024),
}
RERANK = "k_factor_rf"  # FAISS' name for IndexRefine's re-rank depth (candidates = k × k_factor_rf)
RERANK_FACTORS = (4, 8, 16, 32)


class ExactTopK:
    """Running exact top-k (inner product) of fixed queries over vectors seen in batches."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int):
        self.queries, self.query_ids, self.k = queries, query_ids, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def update(self, vectors: np.ndarray, first_id: int, chunk: int = 8192) -> None:
        for start in range(0, len(vectors), chunk):
            self._update(vectors[start:start + chunk], first_id + start)

    def _update(self, vectors: np.ndarray, first_id: int) -> None:
        sims = self.queries @ vectors.T
        ids = np.arange(first_id, first_id + len(vectors))
        inside = np.flatnonzero((self.query_ids >= first_id) & (self.query_ids < first_id + len(vectors)))
        sims[inside, self.query_ids[inside] - first_id] = -np.inf  # held out: a query is not its own neighbour
        self.merge(sims, np.broadcast_to(ids, sims.shape))

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in candidates (scores and ids per query), e.g. another part's exact top-k over other rows."""
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_ids = np.concatenate([self.ids, ids], axis=1)
        keep = np.argpartition(-all_scores, self.k - 1, axis=1)[:, : self.k]
        self.scores = np.take_along_axis(all_scores, keep, axis=1)
        self.ids = np.take_along_axis(all_ids, keep, axis=1)


def set_search_parameter(index: faiss.Index, name: str | None, value: int | None) -> None:
    if name and value is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def apply_tuning(index: faiss.Index, tuning: dict) -> None:
    """Set the search parameters a tuning result chose (`params`, or the older single `param`/`value`)."""
    params = tuning.get("params") or {tuning.get("param"): tuning.get("value")}
    for name, value in params.items():
        set_search_parameter(index, name, value)


def reranks(index: faiss.Index) -> bool:
    """Whether the index re-ranks its candidates exactly (FAISS IndexRefine)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexRefine)


def search_held_out(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k ids for each query with the query's own id removed."""
    _, found = index.search(queries, k + 1)
    out = np.full((len(queries), k), -1, np.int64)
    for i, row in enumerate(found):
        row = row[row != query_ids[i]][:k]
        out[i, : len(row)] = row
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact top-k found by the approximate search."""
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def timed_search(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    """Held-out top-k ids, and the batch queries/s and single-query latency at the index's current parameters."""
    start = time.perf_counter()
    found = search_held_out(index, queries, query_ids, k)
    seconds = time.perf_counter() - start
    single = []
    for q in queries[: min(50, len(queries))]:
        t = time.perf_counter()
        index.search(q[None, :], k)
        single.append(time.perf_counter() - t)
    return found, {"qps": round(len(queries) / max(seconds, 1e-9), 1),
                   "latency_ms_p50": round(float(np.median(single)) * 1e3, 3) if single else None}


def measure(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> dict:
    """Recall@k, batch queries/s and single-query latency at the index's current parameters."""
    found, speed = timed_search(index, queries, query_ids, truth.shape[1])
    return {"recall_at_k": round(recall_at_k(found, truth), 4), **speed}


def _limit(index: faiss.Index, name: str) -> int:
    if name == "nprobe":
        return faiss.extract_index_ivf(index).nlist
    return 1 << 14


def _scan(index: faiss.Index, name: str, values, measure_at, target: float, floor_qps: float = 0.0) -> list[dict]:
    """Measure increasing `values` of `name` until recall reaches `target` (or qps drops below `floor_qps`,
    where a larger value can no longer beat a setting already found)."""
    curve = []
    for value in values:
        set_search_parameter(index, name, value)
        result = {"value": value, **measure_at()}
        curve.append(result)
        if result["recall_at_k"] >= target or result["qps"] < floor_qps:
            break
    return curve


def tune(index: faiss.Index, name: str | None, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
         target: float = 0.95, fixed: int | None = None) -> dict:
    """Smallest value of `name` whose recall reaches `target` (or the `fixed` value), measured; for a re-ranking
    index, the fastest (value, re-rank depth) pair that reaches it."""
    common = {"target_recall": target, "queries": len(queries), "k": truth.shape[1]}
    def measure_at():
        return measure(index, queries, query_ids, truth)
    if name is None:
        return {"param": None, "value": None, "params": {}, **common, **measure_at()}
    values = [fixed] if fixed is not None else [v for v in CANDIDATES[name] if v <= _limit(index, name)]
    curve = []
    for factor in RERANK_FACTORS if reranks(index) else (None,):
        set_search_parameter(index, RERANK, factor)
        reached = [c["qps"] for c in curve if c["recall_at_k"] >= target]
        for point in _scan(index, name, values, measure_at, target, max(reached, default=0.0)):
            curve.append({**point, **({RERANK: factor} if factor else {})})
    hits = [c for c in curve if c["recall_at_k"] >= target]
    best = max(hits, key=lambda c: c["qps"]) if hits else max(curve, key=lambda c: c["recall_at_k"])
    params = {name: best["value"], **({RERANK: best[RERANK]} if RERANK in best else {})}
    apply_tuning(index, {"params": params})
    return {"param": name, "params": params, **common, **best, "reached": best["recall_at_k"] >= target,
            "curve": curve}
