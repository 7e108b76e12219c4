"""Auto-chosen FAISS index vs exact Flat on clustered synthetic CLIP-like vectors, in one run.

    .venv/bin/python bench/index_bench.py --sizes 100000 1000000 --json bench-index.json

For each size: write the vectors as OUT/embeddings/*.parquet, build the index with
`build_index(out, "auto")` (type chosen, nprobe tuned on held-out data vectors), build an exact
`IndexFlatIP` over the same vectors, then search both with the same fresh queries (drawn from the same
distribution, not in the index) and report build time, index memory, recall@10 against the exact
answers, batch queries/s and single-query latency. Both indexes use all cores (FAISS' OpenMP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index.build import build_index, embedding_files, iter_vectors  # noqa: E402
from index.store import INDEX_DIR, load_index  # noqa: E402
from index.tune import recall_at_k  # noqa: E402

SHARD_ROWS = 100_000


class Clustered:
    """CLIP-like unit vectors: clusters of about `points_per_cluster`, each spread over its own random
    `spread_dims`-dimensional subspace plus isotropic noise. Neighbours form a continuum inside a
    cluster (no exact duplicates, no empty space), so IVF needs several lists per query, as on real data.
    """

    def __init__(self, dim: int, clusters: int, spread_dims: int = 16, noise: float = 0.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.bases = (rng.standard_normal((clusters, dim, spread_dims)) / np.sqrt(spread_dims)).astype(np.float32)
        self.noise = noise

    def draw(self, n: int, seed: int, chunk: int = 10_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        parts = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            c = rng.integers(0, len(self.centres), m)
            z = rng.standard_normal((m, self.bases.shape[2])).astype(np.float32)
            x = self.centres[c] + np.einsum("mdr,mr->md", self.bases[c], z)
            x += self.noise * rng.standard_normal(x.shape).astype(np.float32)
            parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        return np.concatenate(parts)


def write_embeddings(out: Path, data: Clustered, n: int) -> None:
    """OUT/embeddings/<shard>.parquet with the columns the index reads (key, shard, image_embedding)."""
    folder = out / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        x = data.draw(min(SHARD_ROWS, n - start), seed=1000 + i)
        shard = f"{i:05d}"
        table = pa.table({
            "key": pa.array([f"{shard}{j:07d}" for j in range(len(x))]),
            "shard": pa.array([shard] * len(x)),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
        })
        pq.write_table(table, folder / f"{shard}.parquet", compression="none")


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """(ids, batch queries/s, median single-query latency in ms)."""
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    qps = len(queries) / (time.perf_counter() - start)
    single = []
    for q in queries[:100]:
        t = time.perf_counter()
        index.search(q[None, :], k)
        single.append(time.perf_counter() - t)
    return ids, qps, float(np.median(single)) * 1e3


def exact_flat(out: str, dim: int) -> tuple[faiss.Index, float]:
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    for vectors, _ in iter_vectors(embedding_files(out)):
        flat.add(vectors)
    return flat, time.perf_counter() - start


def index_bytes(out: str) -> int:
    meta = json.loads((Path(out) / INDEX_DIR / "meta.json").read_text())
    return (Path(out) / INDEX_DIR / meta["files"]["index"]).stat().st_size


def bench_size(n: int, args) -> dict:
    data = Clustered(args.dim, max(1, n // args.points_per_cluster), args.spread_dims, args.noise)
    work = Path(tempfile.mkdtemp(prefix=f"index-bench-{n}-", dir=args.workdir))
    try:
        write_embeddings(work, data, n)
        meta = build_index(str(work), "auto", recall_target=args.recall_target, memory_budget=args.memory_budget)
        index, _, _ = load_index(str(work))
        flat, flat_build = exact_flat(str(work), args.dim)
        queries = data.draw(args.queries, seed=999_999)
        truth, flat_qps, flat_ms = timed_search(flat, queries, 10)
        found, qps, ms = timed_search(index, queries, 10)
        return {
            "n": n, "dim": args.dim, "factory": meta["factory"], "reason": meta["choice"]["reason"],
            "tuned": {"param": meta["tuning"]["param"], "value": meta["tuning"]["value"],
                      "recall_at_10_held_out": meta["tuning"]["recall_at_k"]},
            "build_s": meta["build_seconds"], "timings": meta["timings"], "flat_build_s": round(flat_build, 2),
            "index_mib": round(index_bytes(str(work)) / 2**20, 1), "flat_mib": round(n * args.dim * 4 / 2**20, 1),
            "recall_at_10": round(recall_at_k(found, truth), 4), "qps": round(qps, 1), "flat_qps": round(flat_qps, 1),
            "speedup": round(qps / flat_qps, 1), "latency_ms": round(ms, 3), "flat_latency_ms": round(flat_ms, 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(rows: list[dict]) -> str:
    head = ("| vectors | auto index (tuned) | build s (Flat) | index MiB (Flat) | recall@10 | queries/s (Flat) "
            "| speed-up | 1-query ms (Flat) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        tuned = f"{r['tuned']['param']}={r['tuned']['value']}" if r["tuned"]["param"] else "exact"
        lines.append(f"| {r['n']:,} | `{r['factory']}` ({tuned}) | {r['build_s']:.1f} ({r['flat_build_s']:.1f}) "
                     f"| {r['index_mib']:.0f} ({r['flat_mib']:.0f}) | {r['recall_at_10']:.3f} "
                     f"| {r['qps']:,.0f} ({r['flat_qps']:,.0f}) | {r['speedup']:.1f}× "
                     f"| {r['latency_ms']:.2f} ({r['flat_latency_ms']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--points-per-cluster", type=int, default=1000, help="mean cluster size of the data")
    parser.add_argument("--spread-dims", type=int, default=16, help="dimensions each cluster spreads over")
    parser.add_argument("--noise", type=float, default=0.5, help="isotropic per-dimension noise")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes (default: half of RAM)")
    parser.add_argument("--workdir", default=None, help="where the temporary Parquet files go")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads()}
    rows = []
    for n in args.sizes:
        rows.append(bench_size(n, args))
        print(json.dumps(rows[-1]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmachine: {machine}; peak RSS {peak:.0f} MiB\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "peak_rss_mib": round(peak), "rows": rows,
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
