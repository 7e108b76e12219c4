"""Auto-chosen FAISS index vs exact Flat on clustered synthetic CLIP-like vectors, measured interleaved.

    .venv/bin/python bench/index_bench.py --sizes 100000 1000000 --json bench-index.json
    .venv/bin/python bench/index_bench.py --sizes 1000000 --candidates IVF4096,Flat "IVF4096,PQ64x4fs,RFlat"

For each size: write the vectors as OUT/embeddings/*.parquet, build the index with
`build_index(out, "auto")` (type chosen, search parameters tuned on held-out data vectors), build an exact
`IndexFlatIP` over the same vectors, and search both with the same fresh queries (drawn from the same
distribution, not in the index).

Fairness on a shared machine: the two indexes are timed **interleaved** — several rounds, each searching
the same query batch with every index (the order rotating from round to round), so load that comes and
goes hits both alike. Each index's queries/s is the median over rounds, its spread is (max − min) / median
of the round times, and every speed-up is a ratio of medians from the same rounds. The load average is
recorded before and after, and a warning is printed when a spread is wide.

Memory, per index built through `build_index`: `index_mib` is its FAISS file, read into RAM when loaded
(`load_heap_mib`: this process's anonymous memory growth while loading it); `mapped_mib` is the float16
vectors file of a re-ranked index (`…,Refine(SQfp16)`), memory-mapped, and `mapped_resident_mib` how much of
it this process had resident after the timed searches (pages the re-rank touched; the OS may drop them).

`--candidates` also builds each given FAISS factory string in memory over the same vectors and measures
its recall@10 / queries/s curve over a grid of search parameters (nprobe, efSearch, re-rank depth), each
grid point interleaved with Flat in the same rounds: the curves `index/choose.py` is based on.
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

from index.build import build_index, embedding_files, iter_vectors, new_index, train  # noqa: E402
from index.choose import tune_parameter  # noqa: E402
from index.store import INDEX_DIR, load_index  # noqa: E402
from index.tune import RERANK, recall_at_k, reranks, set_search_parameter  # noqa: E402

SHARD_ROWS = 100_000
WIDE_SPREAD = 0.25  # (max − min) / median of the round times above which a figure is flagged as noisy
K = 10
MEASURES = ("recall_at_10", "qps", "speedup", "spread", "cpu_speedup")  # a curve point's keys that are not parameters


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
    """OUT/embeddings/<shard>.parquet with the columns the index reads (key, shard, image_embedding),
    one shard at a time, so memory stays one shard whatever `n` is."""
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


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def interleaved(searches: dict, queries: np.ndarray, rounds: int) -> dict:
    """Time each `searches[name]()` (a setup, then a batch search of `queries`) once per round, rotating the
    order; {name: {"qps", "spread", "seconds", "ids"}} with queries/s from the median round."""
    times: dict[str, list[float]] = {name: [] for name in searches}
    cpu: dict[str, list[float]] = {name: [] for name in searches}
    ids = {}
    names = list(searches)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            setup, index = searches[name]
            setup()
            start, start_cpu = time.perf_counter(), time.process_time()
            _, ids[name] = index.search(queries, K)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    out = {}
    for name, t in times.items():
        median = float(np.median(t))
        out[name] = {"qps": round(len(queries) / median, 1), "spread": round((max(t) - min(t)) / median, 3),
                     "seconds": [round(s, 4) for s in t], "ids": ids[name],
                     "cpu_qps": round(len(queries) / max(float(np.median(cpu[name])), 1e-9), 1)}
    return out


def latency_ms(index: faiss.Index, queries: np.ndarray) -> float:
    """Median single-query search time."""
    single = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], K)
        single.append(time.perf_counter() - t)
    return round(float(np.median(single)) * 1e3, 3)


def exact_flat(out: str, dim: int) -> tuple[faiss.Index, float]:
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    for vectors, _ in iter_vectors(embedding_files(out)):
        flat.add(vectors)
    return flat, time.perf_counter() - start


def flat_vectors(flat: faiss.IndexFlat) -> np.ndarray:
    """The Flat index's own storage as an (n, d) array, without a copy."""
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def index_files(out: str) -> dict[str, Path]:
    """The index's files by role (`index`: read into RAM; `vectors`: float16 rows, memory-mapped)."""
    meta = json.loads((Path(out) / INDEX_DIR / "meta.json").read_text())
    return {role: Path(out) / INDEX_DIR / name for role, name in meta["files"].items() if role != "ids"}


def rss_kib(field: str = "RssAnon") -> int:
    """This process's resident memory of one kind (RssAnon: heap; RssFile: mapped file pages), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def mapped_resident_kib(path: Path) -> int:
    """KiB of `path` resident in this process's mappings (its pages the searches touched), from smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's header line: address perms offset dev inode [path]
            inside = len(head) >= 6 and head[5] == str(path.resolve())
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def noisy(name: str, result: dict) -> list[str]:
    if result["spread"] <= WIDE_SPREAD:
        return []
    message = f"{name}: round times spread {result['spread']:.0%} of the median (load?) {result['seconds']}"
    print(f"WARNING {message}", flush=True)
    return [message]


def train_size(factory: str, args, total: int | None = None) -> int:
    """`--train-sample`, raised to the 39 points per IVF list that `auto` trains with (so an explicit
    `IVF…` string trains like the auto choice it stands for)."""
    if factory == "auto" or "IVF" not in factory:
        return args.train_sample
    nlist = faiss.extract_index_ivf(new_index(args.dim, factory)).nlist
    return min(total or nlist * 39, max(args.train_sample, nlist * 39))


def build(work: Path, factory: str, args) -> tuple[faiss.Index, dict]:
    """`build_index` over WORK's embeddings into its own OUT (the Parquet files shared by a link)."""
    out = work / f"out-{factory.replace(',', '_')}"
    out.mkdir()
    (out / "embeddings").symlink_to(work / "embeddings", target_is_directory=True)
    meta = build_index(str(out), factory, train_sample=train_size(factory, args), recall_target=args.recall_target,
                       memory_budget=args.memory_budget)
    heap_before = rss_kib()
    index, _, _ = load_index(str(out))
    files = index_files(str(out))
    row = {"factory": meta["factory"], "requested": factory, "reason": meta["choice"]["reason"],
           "tuned": {"params": meta["tuning"].get("params"), "recall_at_10_held_out": meta["tuning"]["recall_at_k"]},
           "build_s": meta["build_seconds"], "timings": meta["timings"],
           "index_mib": round(files["index"].stat().st_size / 2**20, 1),  # read into RAM
           "mapped_mib": round(files["vectors"].stat().st_size / 2**20, 1) if "vectors" in files else 0.0,
           "load_heap_mib": round((rss_kib() - heap_before) / 1024, 1), "vectors_file": str(files.get("vectors", ""))}
    return index, row


def setter(index: faiss.Index, params: dict):
    return lambda: [set_search_parameter(index, k, v) for k, v in params.items()]


def bench_size(n: int, args) -> list[dict]:
    """Build every `--factory` (through build_index) and `--candidates` index once, then time them against
    Flat at each `--threads` count."""
    data = Clustered(args.dim, max(1, n // args.points_per_cluster), args.spread_dims, args.noise)
    work = Path(tempfile.mkdtemp(prefix=f"index-bench-{n}-", dir=args.workdir))
    try:
        faiss.omp_set_num_threads(args.build_threads or args.threads[0])
        write_embeddings(work, data, n)
        built = [build(work, f, args) for f in args.factory]
        flat, flat_build = exact_flat(str(work), args.dim)
        for _, row in built:
            row.update(n=n, dim=args.dim, flat_build_s=round(flat_build, 2), flat_mib=round(n * args.dim * 4 / 2**20, 1))
        curves = [(row["factory"], index, row["build_s"]) for index, row in built if args.curves and row["tuned"]["params"]]
        curves += [(c, *build_candidate(c, flat, args)) for c in args.candidates]
        queries = data.draw(args.queries, seed=999_999)
        return [r for threads in args.threads for r in timed_rows(built, curves, flat, queries, threads, args)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed_rows(built: list, curves: list, flat: faiss.Index, queries: np.ndarray, threads: int, args) -> list[dict]:
    """One row per `--factory` (at its tuned parameters) and one curve per curve index, every index and grid
    point timed in the same interleaved rounds as Flat (so Flat's long search is paid once per round)."""
    faiss.omp_set_num_threads(threads)
    searches = {"flat": (lambda: None, flat)}
    searches |= {f: (setter(index, row["tuned"]["params"] or {}), index) for f, (index, row) in zip(args.factory, built)}
    grids = {label: grid(index, label, args) for label, index, _ in curves}
    searches |= {f"{label} {json.dumps(p)}": (setter(index, p), index) for label, index, _ in curves for p in grids[label]}
    before = load_average()
    timed = interleaved(searches, queries, args.rounds)
    after, fl = load_average(), timed["flat"]
    rows = []
    for f, (index, row) in zip(args.factory, built):
        t = timed[f]
        searches[f][0]()
        rows.append({**row, "threads": threads, "rounds": args.rounds, "load_before": before, "load_after": after,
                     "recall_at_10": round(recall_at_k(t["ids"], fl["ids"]), 4), "qps": t["qps"], "flat_qps": fl["qps"],
                     "speedup": round(t["qps"] / fl["qps"], 1), "spread": t["spread"], "flat_spread": fl["spread"],
                     "cpu_qps": t["cpu_qps"], "flat_cpu_qps": fl["cpu_qps"],
                     "cpu_speedup": round(t["cpu_qps"] / fl["cpu_qps"], 1), "seconds": t["seconds"],
                     "flat_seconds": fl["seconds"], "warnings": noisy("flat", fl) + noisy(f, t),
                     "latency_ms": latency_ms(index, queries[:100]), "flat_latency_ms": latency_ms(flat, queries[:10]),
                     "mapped_resident_mib": round(mapped_resident_kib(Path(row["vectors_file"])) / 1024, 1)
                     if row["vectors_file"] else 0.0})
        print(json.dumps(rows[-1]), flush=True)
    rows[-1]["candidates"] = [curve(label, build_s, grids[label], timed, args) for label, _, build_s in curves]
    return rows


def grid(index: faiss.Index, factory: str, args) -> list[dict]:
    """The search-parameter settings a candidate's curve is measured at."""
    name = tune_parameter(factory)
    if name is None:
        return [{}]
    values = args.nprobe if name == "nprobe" else args.ef_search
    if name == "nprobe":
        values = [v for v in values if v <= faiss.extract_index_ivf(index).nlist]
    factors = args.k_factor if reranks(index) else [None]
    return [{name: v, **({RERANK: f} if f else {})} for f in factors for v in values]


def build_candidate(factory: str, flat: faiss.IndexFlat, args) -> tuple[faiss.Index, float]:
    """`factory` trained on a sample of Flat's vectors and filled with all of them, in memory."""
    vectors = flat_vectors(flat)
    start = time.perf_counter()
    index = new_index(flat.d, factory)
    wanted = train_size(factory, args, flat.ntotal)
    rng = np.random.default_rng(0)
    train(index, vectors[np.sort(rng.choice(flat.ntotal, wanted, replace=False))])
    for s in range(0, flat.ntotal, 65_536):
        index.add(vectors[s:s + 65_536])
    print(f"built {factory} in {time.perf_counter() - start:.0f} s", flush=True)
    return index, time.perf_counter() - start


def curve(label: str, build_s: float, settings: list[dict], timed: dict, args) -> dict:
    """Recall@10, queries/s and speed-up over Flat (same rounds) of one index at each of its grid points."""
    fl = timed["flat"]
    points = []
    for p in settings:
        t = timed[f"{label} {json.dumps(p)}"]
        points.append({**p, "recall_at_10": round(recall_at_k(t["ids"], fl["ids"]), 4), "qps": t["qps"],
                       "speedup": round(t["qps"] / fl["qps"], 1), "spread": t["spread"],
                       "cpu_speedup": round(t["cpu_qps"] / fl["cpu_qps"], 1)})
    result = {"factory": label, "build_s": round(build_s, 1), "flat_qps": fl["qps"], "flat_spread": fl["spread"],
              "flat_cpu_qps": fl["cpu_qps"],
              "points": points, "warnings": [w for p in settings for w in noisy(f"{label} {json.dumps(p)}",
                                                                                  timed[f"{label} {json.dumps(p)}"])]}
    print(json.dumps(result), flush=True)
    return result


def markdown(rows: list[dict]) -> str:
    head = ("| vectors | threads | index (tuned) | build s (Flat) | index MiB in RAM (Flat) | mapped MiB (resident) "
            "| recall@10 | queries/s (Flat) "
            "| speed-up | CPU-time speed-up | spread (Flat) | load avg before → after | 1-query ms (Flat) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        tuned = ", ".join(f"{k}={v}" for k, v in (r["tuned"]["params"] or {}).items()) or "exact"
        lines.append(f"| {r['n']:,} | {r['threads']} | `{r['factory']}` ({tuned}) | {r['build_s']:.1f} ({r['flat_build_s']:.1f}) "
                     f"| {r['index_mib']:.0f} ({r['flat_mib']:.0f}) | {r['mapped_mib']:.0f} ({r['mapped_resident_mib']:.0f}) "
                     f"| {r['recall_at_10']:.3f} "
                     f"| {r['qps']:,.0f} ({r['flat_qps']:,.0f}) | **{r['speedup']:.1f}×** | {r['cpu_speedup']:.1f}× "
                     f"| {r['spread']:.0%} ({r['flat_spread']:.0%}) | {r['load_before'][0]} → {r['load_after'][0]} "
                     f"| {r['latency_ms']:.2f} ({r['flat_latency_ms']:.2f}) |")
    for r in rows:
        for c in r.get("candidates", []):
            lines.append(f"\n`{c['factory']}` at {r['n']:,}, {r['threads']} thread(s) (built in {c['build_s']:.0f} s; "
                         f"Flat {c['flat_qps']:,.0f} queries/s in the same rounds, "
                         f"load {r['load_before'][0]} → {r['load_after'][0]}):\n")
            lines.append("| parameters | recall@10 | queries/s | speed-up | CPU-time speed-up | spread |\n"
                         "|---|---|---|---|---|---|")
            for p in c["points"]:
                params = ", ".join(f"{k}={v}" for k, v in p.items() if k not in MEASURES)
                lines.append(f"| {params or 'exact'} | {p['recall_at_10']:.3f} | {p['qps']:,.0f} | {p['speedup']:.1f}× "
                             f"| {p['cpu_speedup']:.1f}× "
                             f"| {p['spread']:.0%} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--factory", nargs="+", default=["auto"],
                        help="indexes built through build_index and timed against Flat in the same rounds")
    parser.add_argument("--candidates", nargs="*", default=[], help="FAISS factory strings whose curves to measure")
    parser.add_argument("--curves", action="store_true", help="also measure the --factory indexes' curves")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--train-sample", type=int, default=100_000,
                        help="training vectors (auto raises it to 39 per IVF list; candidates too)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="OpenMP threads FAISS searches with "
                        "(each count timed in its own interleaved rounds)")
    parser.add_argument("--build-threads", type=int, default=None, help="OpenMP threads for building (default: --threads)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--points-per-cluster", type=int, default=1000, help="mean cluster size of the data")
    parser.add_argument("--spread-dims", type=int, default=16, help="dimensions each cluster spreads over")
    parser.add_argument("--noise", type=float, default=0.5, help="isotropic per-dimension noise")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes (default: half of RAM)")
    parser.add_argument("--workdir", default=None, help="where the temporary Parquet files go")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "faiss": faiss.__version__, "search_threads": args.threads,
               "build_threads": args.build_threads or args.threads[0]}
    rows = []
    for n in args.sizes:
        rows.extend(bench_size(n, args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmachine: {machine}; peak RSS {peak:.0f} MiB\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "peak_rss_mib": round(peak), "rows": rows,
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
