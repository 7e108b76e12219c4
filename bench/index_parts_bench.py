"""The index built in parts on Ray with 1 and 2 workers, then served: issue 20's build and serving figures.

    .venv/bin/python bench/index_parts_bench.py --size 5000000 --workers 1 2 --workdir /big/disk

For the clustered synthetic vectors of bench/index_bench.py (written once as Parquet under --workdir):
- each worker count builds `auto` in parts (`flows/index_build.py:build_on_ray`, a local Ray with that many
  CPUs, one part task per CPU; the driver's own FAISS threads bounded by the same count) in a fresh driver
  process of its own, which reports its wall time and its own peak RSS (the driver's: Ray's workers are other
  processes), in all (ru_maxrss) and by kind, sampled every 0.2 s: anonymous (its heap) and file-backed (pages of
  the memory-mapped float16 file: once the file is in the page cache, the kernel maps cached pages around each
  fault, so tuning's scattered reads can show the whole file resident without using memory of its own); the
  merge, tuning and publish run in one Ray task of their own, whose process's peak RSS is printed as logged. The
  counts run in the order given, then again reversed when `--rounds 2`, and the speed-up is a ratio of medians;
- the indexes of all counts must answer the same 1,000 fresh queries identically (at the same nprobe and re-rank
  depth: the tuned ones depend on measured speed);
- a fresh process drops the first index's files from the page cache (a server started on files the cache does
  not hold), opens it as `shardlight serve` does (`Searcher`: memory-mapped), runs the 1,000 queries and reports
  its resident memory (heap and mapped file pages, /proc/self/status) against the size of the index's files.
The load average is printed before and after. Needs free disk for the Parquet (4·d bytes a vector) and each
index (about 2·d + 40 bytes a vector).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.index_bench import Clustered, write_embeddings  # noqa: E402

MEMORY = """
import os, threading, time
def status():
    return {k: int(v.split()[0]) / 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
            if k in ("RssAnon", "RssFile", "RssShmem")}
peaks = {"RssAnon": 0.0, "RssFile": 0.0, "RssShmem": 0.0, "total": 0.0}
def sample():
    while True:
        now = status()
        for k, v in [*now.items(), ("total", sum(now.values()))]:
            peaks[k] = max(peaks[k], v)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
def evict(folder):
    # a server started on files the page cache does not hold (else the kernel maps cached pages around each fault)
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
"""

BUILD = MEMORY + """
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")  # the last task's own peak RSS is logged
from flows.index_build import build_on_ray
from index.build import BuildSpec
from shardlight.core.config import RaySpec
start = time.perf_counter()
meta = build_on_ray(sys.argv[1], BuildSpec("auto"), RaySpec(num_cpus=int(sys.argv[2])), int(sys.argv[3]))
seconds = time.perf_counter() - start
time.sleep(0.3)
print(json.dumps({"seconds": seconds, "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "driver_peaks_mib": peaks, "factory": meta["factory"], "parts": meta["parts"],
                  "timings": meta["timings"], "tuning": meta["tuning"]["params"], "files": meta["files"]}))
"""

SERVE = MEMORY + """
import json, sys
from pathlib import Path
import numpy as np
from index.search import Searcher
folder = Path(sys.argv[1]) / "index"
evict(folder)
queries = np.load(sys.argv[2])
opened = status()
s = Searcher(sys.argv[1])
loaded = status()
s.index.search(queries, 10)
files = sum(p.stat().st_size for p in folder.iterdir() if p.name != "meta.json") / 2**20
print(json.dumps({"before_mib": opened, "loaded_mib": loaded, "after_queries_mib": status(), "files_mib": files}))
"""


def run(code: str, *args: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:  # the error's own lines, without a crash dump's list of extension modules
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("Extension modules:")]
        tail = "\n".join(lines[-25:])
        raise SystemExit(f"failed (exit {done.returncode}):\n{tail}")
    for line in done.stderr.splitlines():
        if "published by one task" in line:
            print(line.strip(), flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def answers(out: Path, queries: np.ndarray, params: dict) -> np.ndarray:
    from index.store import load_index
    from index.tune import apply_tuning

    index, _, _ = load_index(str(out), mmap=True)
    apply_tuning(index, {"params": params})
    return index.search(queries, 10)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=1, help="2: the counts again in reverse order")
    parser.add_argument("--part-rows", type=int, default=500_000)
    parser.add_argument("--workdir", default=None, help="a folder with room for the Parquet and the indexes "
                        "(made if missing; the system's temporary folder by default)")
    args = parser.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="index-parts-", dir=args.workdir))
    try:
        data = Clustered(args.dim, max(1, args.size // 1000))
        write_embeddings(work, data, args.size)
        queries = data.draw(1000, seed=999_999)
        np.save(work / "queries.npy", queries)
        print(f"load average before: {os.getloadavg()}", flush=True)
        order = [w for r in range(args.rounds) for w in (args.workers if r % 2 == 0 else args.workers[::-1])]
        builds: dict[int, list[dict]] = {w: [] for w in args.workers}
        for i, workers in enumerate(order):
            out = work / f"out-{workers}-{i}"
            out.mkdir()
            (out / "embeddings").symlink_to(work / "embeddings", target_is_directory=True)
            builds[workers].append({**run(BUILD, str(out), str(workers), str(args.part_rows)), "out": str(out)})
            print(json.dumps({"workers": workers, **builds[workers][-1]}), flush=True)
        first = builds[args.workers[0]][0]
        reference = answers(Path(first["out"]), queries, first["tuning"])
        same = all(np.array_equal(reference, answers(Path(b["out"]), queries, first["tuning"]))
                   for bs in builds.values() for b in bs)
        seconds = {w: float(np.median([b["seconds"] for b in bs])) for w, bs in builds.items()}
        served = run(SERVE, first["out"], str(work / "queries.npy"))
        print(json.dumps({"identical_answers": same, "median_seconds": seconds,
                          "speedup": {w: round(seconds[args.workers[0]] / s, 2) for w, s in seconds.items()},
                          "driver_peak_rss_mib": {w: max(b["driver_peak_rss_mib"] for b in bs) for w, bs in builds.items()},
                          "driver_peak_anon_mib": {w: max(b["driver_peaks_mib"]["RssAnon"] for b in bs)
                                                   for w, bs in builds.items()},
                          "served": served, "load_after": os.getloadavg()}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
