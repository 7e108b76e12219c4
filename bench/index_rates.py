"""Per-core rates of the index build's steps, and what they project for 10M–5B vectors (docs/scale.md).

    .venv/bin/python bench/index_rates.py --json rates.json          # ~2 min on one core

Measured on ONE thread (faiss.omp_set_num_threads(1)), on the clustered synthetic vectors of bench/index_bench.py,
at 512 and 768 dimensions:
- k-means (the coarse quantizer's training): seconds per (training point × list × dimension);
- PQ training (4-bit fast-scan and 8-bit codebooks) on the same sample;
- coarse assignment per vector: a flat scan of 1,024 centroids (cost grows with the lists) and an HNSW32 graph
  over 16,384 centroids (taken as constant beyond: HNSW search grows about logarithmically);
- encoding per vector (add minus assignment) for the fast-scan and 8-bit PQ codecs;
- Parquet read (index/vectors.py:iter_vectors) and float16 write, per vector;
- the searcher's id map, bytes per row (index/search.py's Arrow key column and numpy arrays, and the Python
  strings it kept before).

The projection takes `choose_index`'s choice for each size (RAM budget `--budget-gib`, lists on disk when built
in parts) and adds up core-seconds: train once (k-means on 39 points per list, PQ on the same sample), then
per vector read + assign + encode + float16 write. Nodes for a one-day build = core-seconds / (86,400 ×
`--node-cores`). The merge (sequential I/O) and tuning are not included. Extrapolations, not measurements:
the table says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.index_bench import Clustered, write_embeddings  # noqa: E402
from index.build import new_index  # noqa: E402
from index.choose import HNSW_QUANTIZER_LISTS, MIN_POINTS_PER_LIST, choose_index  # noqa: E402
from index.rerank import split_factory  # noqa: E402
from index.vectors import embedding_files, iter_vectors  # noqa: E402

SIZES = (10_000_000, 100_000_000, 1_000_000_000, 5_000_000_000)
LISTS = 1024
PQ_TRAIN = 10_000  # points the PQ codebooks are trained on (≥ 39 per 8-bit centroid)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rates(dim: int, n_add: int, lists: int = LISTS, hnsw_lists: int = HNSW_QUANTIZER_LISTS) -> dict:
    data = Clustered(dim, 200)
    x = data.draw(n_add, seed=1)
    sample = x[: lists * MIN_POINTS_PER_LIST]
    kmeans = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
    train_s = timed(lambda: kmeans.train(sample))
    out = {"dim": dim, "lists": lists, "hnsw_lists": hnsw_lists, "added": n_add,
           "kmeans_s_per_point_list_dim": train_s / (len(sample) * lists * dim)}
    quantizer = faiss.downcast_index(kmeans.quantizer)
    out["assign_flat_s_per_vector_per_list"] = timed(lambda: quantizer.search(x, 1)) / n_add / lists
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(data.draw(hnsw_lists, seed=2))
    out["assign_hnsw_s_per_vector"] = timed(lambda: hnsw.search(x, 1)) / n_add
    for name, codec in (("fast_scan", f"PQ{dim // 8}x4fs"), ("pq8", f"PQ{dim // 8}")):
        index = new_index(dim, f"IVF{lists},{codec}")  # as the build makes it (no polysemous training)
        index.quantizer.add(quantizer.reconstruct_n(0, lists))  # the same trained lists: time the codec only
        out[f"train_{name}_s"] = timed(lambda: index.train(x[:PQ_TRAIN]))  # codebooks: a fixed-size sample
        add = timed(lambda: index.add(x)) / n_add
        out[f"encode_{name}_s_per_vector"] = max(0.0, add - out["assign_flat_s_per_vector_per_list"] * lists)
    with tempfile.TemporaryDirectory() as work:
        write_embeddings(Path(work), data, n_add)
        out["read_s_per_vector"] = timed(lambda: [None for _ in iter_vectors(embedding_files(work))]) / n_add
        f16 = Path(work) / "f16"
        out["float16_write_s_per_vector"] = timed(lambda: f16.write_bytes(x.astype(np.float16).tobytes())) / n_add
    return out


def id_map_bytes(n: int = 1_000_000) -> dict:
    """Bytes per row of the searcher's id map: as index/search.py holds it now (key and shard columns in Arrow: their
    buffers' size; rows int64 and parts int32 in numpy) and as it held it before (keys and shards as Python
    strings: this process's resident growth while making them)."""
    table = pa.table({"shard": [f"{i // 10000:05d}" for i in range(n)],
                      "key": [f"{i // 10000:05d}{i % 10000:07d}" for i in range(n)]})
    arrow = (table.column("key").nbytes + table.column("shard").nbytes + n * (8 + 4)) / n
    gc.collect()
    before = rss()
    held = (table.column("key").to_pylist(), table.column("shard").to_pylist())
    python = (rss() - before) / n + 8 + 4
    del held
    return {"arrow": round(arrow, 1), "python": round(python, 1)}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def project(r: dict, n: int, budget: int, node_cores: int) -> dict:
    """Core-seconds, bytes and nodes to build and serve `n` vectors of `r['dim']` as auto would, in parts."""
    dim = r["dim"]
    plan = choose_index(n, dim, budget, on_disk=True)
    base, _ = split_factory(plan.factory)
    nlist = int(base.split(",")[0].split("_")[0][3:])
    fast_scan = "x4fs" in base
    assign = r["assign_hnsw_s_per_vector"] if nlist >= HNSW_QUANTIZER_LISTS else \
        r["assign_flat_s_per_vector_per_list"] * nlist
    per_vector = r["read_s_per_vector"] + assign + r["float16_write_s_per_vector"] + \
        r[f"encode_{'fast_scan' if fast_scan else 'pq8'}_s_per_vector"]
    points = min(n, nlist * MIN_POINTS_PER_LIST)
    train = r["kmeans_s_per_point_list_dim"] * points * nlist * dim + r[f"train_{'fast_scan' if fast_scan else 'pq8'}_s"]
    code = dim // 16 if fast_scan else dim // 8
    lists, f16 = n * (code + 8), n * dim * 2
    core_s = train + n * per_vector
    return {"n": n, "dim": dim, "factory": plan.factory, "bytes_per_vector_ram": round(plan.bytes_estimate / n, 1),
            "bytes_per_vector_disk": code + 8 + 2 * dim, "serve_ram_gib": round(plan.bytes_estimate / 2**30, 1),
            "id_map_gib": round(n * r["id_map_bytes_per_row"]["arrow"] / 2**30, 1),
            "disk_gib": round((lists + f16) / 2**30, 1), "build_disk_gib": round((2 * lists + f16) / 2**30, 1),
            "parquet_gib": round(n * dim * 4 / 2**30, 1), "train_core_h": round(train / 3600, 2),
            "add_core_h": round(n * per_vector / 3600, 1), "core_h": round(core_s / 3600, 1),
            "nodes_one_day": round(core_s / (86_400 * node_cores), 2), "merged": "in RAM" if fast_scan else "on disk"}


def markdown(rows: list[dict]) -> str:
    lines = ["| vectors | d | index (auto, built in parts) | bytes/vector RAM · disk | serve: RAM (+ id map) | "
             "disk: index · build peak · Parquet | train core-h | add core-h | nodes for one day |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['dim']} | `{r['factory']}` ({r['merged']}) | {r['bytes_per_vector_ram']} · "
                     f"{r['bytes_per_vector_disk']} | {r['serve_ram_gib']} GiB (+ {r['id_map_gib']} GiB) | "
                     f"{r['disk_gib']:,} · {r['build_disk_gib']:,} · {r['parquet_gib']:,} GiB | {r['train_core_h']} | "
                     f"{r['add_core_h']:,} | {r['nodes_one_day']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=int, default=100_000, help="vectors added per measurement")
    parser.add_argument("--lists", type=int, default=LISTS, help="lists of the measured k-means and flat assignment")
    parser.add_argument("--hnsw-lists", type=int, default=HNSW_QUANTIZER_LISTS, help="centroids in the HNSW quantizer")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--budget-gib", type=float, default=32, help="RAM budget of a serving node")
    parser.add_argument("--node-cores", type=int, default=16, help="cores per build node (autofaiss used 16)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    load = os.getloadavg()
    measured = []
    for d in args.dims:
        measured.append(rates(d, args.add, args.lists, args.hnsw_lists))
        print(json.dumps(measured[-1]), flush=True)
    per_row = id_map_bytes()
    for r in measured:
        r["id_map_bytes_per_row"] = per_row
    rows = [project(r, n, int(args.budget_gib * 2**30), args.node_cores) for r in measured for n in SIZES]
    result = {"load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in os.getloadavg()],
              "cores": os.cpu_count(), "faiss": faiss.__version__, "threads": 1, "rates": measured, "projection": rows,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(result, indent=2))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
