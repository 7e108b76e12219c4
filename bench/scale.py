"""Scaling: the same shards through the Ray embedding stage with 1 and 2 CPU workers (and 1 GPU if present).

    python bench/scale.py [--config configs/demo.yaml] [--shards 8] [--samples-per-shard 256]

Prints images/s per pool size and the speed-up over one CPU worker, all measured in this run. Actor
start-up (model load) is excluded: each measurement times `ShardPool.run` only. A shard that fails, or a
pool that returns fewer shards than it was given, stops the bench with an error naming them: a rate over
the shards that happened to finish would be a wrong number, not a slower one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from bench.common import machine, print_ratios  # noqa: E402
from shardlight.core.config import CONFIG_DIR, load_config  # noqa: E402
from shardlight.training.synthetic import write_shards  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402
from workers.pool import PoolPlan, ShardPool  # noqa: E402


class IncompleteRun(RuntimeError):
    """The pool did not finish every shard: no rate is reported for a partial run."""


def require_complete(result, shards: list[str], plan: PoolPlan) -> None:
    if result.failed or len(result.stats) != len(shards):
        failed = "; ".join(f"{shard}: {reason}" for shard, reason in sorted(result.failed.items()))
        raise IncompleteRun(f"{plan.describe()}: {len(result.stats)} of {len(shards)} shard(s) finished"
                            + (f"; failed: {failed}" if failed else ""))


def measure(cfg, shards: list[str], out: Path, plan: PoolPlan) -> float:
    pool = ShardPool(ShardEmbedder, (cfg.clip, cfg.labels, cfg.compute), str(out), plan, max_retries=0)
    try:
        start = time.perf_counter()
        result = pool.run(shards)
        seconds = time.perf_counter() - start
    finally:
        pool.close()
    require_complete(result, shards, plan)
    return sum(s["rows"] for s in result.stats) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "demo.yaml")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    setups = [("1 CPU worker", PoolPlan(1, 1.0, 0, 1)), ("2 CPU workers", PoolPlan(2, 1.0, 0, 2))]
    if gpus:
        setups.append(("1 GPU worker", PoolPlan(1, 1.0, 1.0, 1)))
    with tempfile.TemporaryDirectory(prefix="shardlight-scale-") as tmp:
        shards = [str(p) for p in write_shards(Path(tmp) / "data", args.shards, args.samples_per_shard, seed=7)]
        results = [(name, measure(cfg, shards, Path(tmp) / f"out{i}", plan)) for i, (name, plan) in enumerate(setups)]
    ray.shutdown()
    print(f"\n{machine()}; config {args.config.name}; {args.shards} shards × {args.samples_per_shard} images")
    print_ratios(results, "speed-up", first_title="pool")


if __name__ == "__main__":
    try:
        main()
    except IncompleteRun as err:
        sys.exit(f"bench/scale.py: FAILED, no result: {err}")
