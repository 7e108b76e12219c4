"""shardlight against its direct peer, clip-retrieval 2.45's `inference`, on the same shards and checkpoint.

    python bench/peer_clip_retrieval.py [--samples 2000] [--shards 4] [--rounds 2] [--peer-venv DIR]

Both tools embed images and captions of the same img2dataset-like shards (256-px JPEGs, captions of
realistic length; bench/common.py) with the same random-init open_clip ViT-B-32 loaded from a local
safetensors file, batch 64, no labels, no index. Each is started as a user starts it, in a fresh process,
and timed wall clock from start to exit; rounds alternate which tool goes first (A B, B A, …), and
shardlight's private Prefect database is created before the first round, untimed. Printed:
images/s of each (median and range over rounds), each tool's own in-loop rate, and shardlight ÷ peer.

clip-retrieval pins numpy<2 and open_clip<3, so it gets its own virtualenv, made with pip from the
versions in bench/peer_clip_retrieval.txt: under a temporary folder by default (about 6.4 GB and
several minutes), or once in --peer-venv DIR and reused from there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchError,
    bench_env,
    failed,
    machine,
    median_spread,
    prime_prefect,
    run_shardlight,
    worker_line,
    write_photo_shards,
    write_random_clip,
    write_run_config,
)

PEER = "clip-retrieval==2.45.0"
# torch and torchvision are named so pip takes the builds on this machine's disk, the ones shardlight uses.
PEER_INSTALL = ["setuptools<81", "torch==2.14.1", "torchvision==0.29.1", PEER]
CONSTRAINTS = Path(__file__).with_name("peer_clip_retrieval.txt")
READY = ".shardlight-peer-ready"  # written last: a folder without it is a half-built venv


def ensure_peer_venv(venv: Path) -> Path:
    """The clip-retrieval executable in `venv`, building the venv first when it is missing or half-built."""
    if (venv / READY).is_file():
        return venv / "bin" / "clip-retrieval"
    if venv.exists():
        if not (venv / "pyvenv.cfg").is_file():
            raise BenchError(f"--peer-venv {venv} exists and is not a virtualenv")
        shutil.rmtree(venv)
    print(f"installing {PEER} into {venv} (several minutes, ~6.4 GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "-c", str(CONSTRAINTS), *PEER_INSTALL], capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["see pip's output"]
        raise BenchError(f"pip could not install {PEER} into {venv}: {errors[0]}")
    (venv / READY).write_text(" ".join([*pip, "-c", CONSTRAINTS.name, *PEER_INSTALL]) + "\n")
    return venv / "bin" / "clip-retrieval"


@dataclass
class Workload:
    """What both tools are given: the shards, the weights file, the run config, and where to write."""

    tmp: Path
    shards: list[Path]
    weights: Path
    config: Path  # shardlight's run config
    peer: Path  # the clip-retrieval executable
    env: dict[str, str]
    worker: str = "not recorded"  # the last shardlight run's worker record


def run_peer(work: Workload, out: Path, args) -> tuple[float, dict]:
    """`clip-retrieval inference` on the shards; returns (wall seconds, its stats: sample_count, total_duration)."""
    first, last = work.shards[0], work.shards[-1]
    cmd = [str(work.peer), "inference", "--input_dataset", str(first.parent / f"{{{first.stem}..{last.stem}}}.tar"),
           "--output_folder", str(out), "--input_format", "webdataset",
           "--clip_model", f"open_clip:{args.model}/{work.weights}", "--enable_text", "True",
           "--batch_size", str(args.batch_size), "--num_prepro_workers", str(args.peer_workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=work.env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise failed("clip-retrieval inference", done)
    return wall, json.loads((out / "stats" / "0.json").read_text())


def one_round(order: list[str], work: Workload, args, results: dict) -> None:
    """Run both tools once, in `order`, each into a fresh output folder (deleted after)."""
    for tool in order:
        out = work.tmp / f"out-{tool}"
        if tool == "shardlight":
            wall, summary = run_shardlight(work.config, work.shards[0].parent, out, work.env)
            rows, loop = summary["rows"], summary["images_per_s"]
            work.worker = worker_line(summary)
        else:
            wall, stats = run_peer(work, out, args)
            rows, loop = stats["sample_count"], stats["sample_count"] / stats["total_duration"]
        shutil.rmtree(out)
        if rows != args.samples:
            raise BenchError(f"{tool} embedded {rows} of {args.samples} samples")
        results[tool]["wall"].append(rows / wall)
        results[tool]["loop"].append(loop)
        print(f"  {tool:<15} {wall:7.1f} s wall, {rows / wall:6.1f} images/s (in its loop {loop:.1f})", flush=True)


def report(results: dict, work: Workload, args) -> None:
    ours, peer = results["shardlight"], results["clip-retrieval"]
    ratios = [a / b for a, b in zip(ours["wall"], peer["wall"])]
    print(f"\n{machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{args.model} (random weights, local file); {args.samples} images of 256 px in {args.shards} shards, "
          f"captions median 10 words; batch {args.batch_size}; rounds: {args.rounds}, alternating")
    print(f"{'images/s, median (range)':<44}{'wall clock':>18}{'in its loop':>18}")
    print(f"{'clip-retrieval 2.45.0 inference, ' + str(args.peer_workers) + ' workers':<44}"
          f"{median_spread(peer['wall']):>18}{median_spread(peer['loop']):>18}")
    print(f"{'shardlight run (loop: embedding stage)':<44}{median_spread(ours['wall']):>18}{median_spread(ours['loop']):>18}")
    print(f"shardlight ÷ clip-retrieval, wall clock: {statistics.median(ours['wall']) / statistics.median(peer['wall']):.2f} "
          f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"shardlight's worker: {work.worker}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="each round runs both tools; the order alternates")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--peer-workers", type=int, default=2, help="clip-retrieval's DataLoader workers")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--peer-venv", type=Path, help="build clip-retrieval's venv here once and reuse it")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="shardlight's compute.precision (auto: bf16 on a CPU with native bf16; the peer "
                             "runs float32 on a CPU)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="shardlight-peer-") as tmp:
        tmp = Path(tmp)
        peer = ensure_peer_venv((args.peer_venv or tmp / "peer-venv").resolve())
        shards = write_photo_shards(tmp / "data", args.samples, args.shards)
        weights = write_random_clip(args.model, tmp / f"{args.model}-random.safetensors")
        config = write_run_config(tmp / "run.yaml", args.model, weights, args.batch_size, args.precision)
        work = Workload(tmp, shards, weights, config, peer, bench_env(tmp))
        prime_prefect(work.env)
        results = {tool: {"wall": [], "loop": []} for tool in ("shardlight", "clip-retrieval")}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            one_round(["shardlight", "clip-retrieval"][:: 1 if r % 2 == 0 else -1], work, args, results)
        report(results, work, args)


if __name__ == "__main__":
    main()
