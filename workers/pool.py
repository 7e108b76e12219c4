"""A pool of Ray actors that process shards: sized to the cluster, retrying shards whose actor died.

The driver ships a builder (a shard-worker class) and its constructor arguments (specs), never models;
each actor builds its worker once and then calls `worker.process(shard_url, out) -> stats` per shard,
writing the shard's outputs itself and returning only small stats. Any class with `describe()` and
`process()` can be a shard worker (the embedder, the augmenter).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from workers.config import RaySpec, RunConfig
from workers.embed import ShardEmbedder
from workers.errors import ClusterError, ShardlightError

log = logging.getLogger("shardlight")


@ray.remote
class ShardActor:
    """Holds one shard worker; a start-up failure is kept and handed to the driver by `ready()`."""

    def __init__(self, builder: Callable, args: tuple):
        self.worker, self.error = None, None
        try:
            self.worker = builder(*args)
        except ShardlightError as err:  # re-raised by the driver as the same one-line error
            self.error = err
        except Exception as err:
            self.error = ClusterError(f"worker failed to start: {type(err).__name__}: {err}")

    def ready(self) -> dict:
        return {"error": self.error} if self.error else {"error": None, **self.worker.describe()}

    def process(self, shard_url: str, out: str) -> dict:
        return self.worker.process(shard_url, out)


def connect(spec: RaySpec) -> bool:
    """Join the configured cluster or start a local Ray; returns True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address == "local":
        kwargs["num_cpus"] = spec.num_cpus
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot reach Ray at {address!r}: {str(err).splitlines()[0]}") from None
    return True


@dataclass
class PoolPlan:
    actors: int
    num_cpus: float
    num_gpus: float

    def describe(self) -> str:
        each = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return f"{self.actors} actor(s), {each} each"


def plan_pool(cfg: RunConfig, shards: int) -> PoolPlan:
    """One actor per GPU when the cluster has GPUs; otherwise one CPU actor per two CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    use_gpu = gpus > 0 and cfg.compute.device != "cpu" and cfg.ray.gpus_per_actor > 0
    if use_gpu:
        wanted = cfg.ray.num_actors or max(1, int(gpus / cfg.ray.gpus_per_actor))
        gpu_each = cfg.ray.gpus_per_actor
    else:
        wanted = cfg.ray.num_actors or max(1, int(cpus // 2))
        gpu_each = 0.0
    return PoolPlan(actors=max(1, min(wanted, shards)), num_cpus=cfg.ray.cpus_per_actor, num_gpus=gpu_each)


@dataclass
class PoolResult:
    stats: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard url -> reason
    worker: dict = field(default_factory=dict)


class ShardPool:
    """Hands shards to actors, two in flight per actor, and replaces actors that die."""

    def __init__(self, builder: Callable, args: tuple, out: str, plan: PoolPlan, max_retries: int,
                 ready_timeout: float = 300.0):
        self.builder, self.args, self.out, self.plan = builder, args, out, plan
        self.max_retries, self.ready_timeout = max_retries, ready_timeout
        self.actors = [self._start_actor() for _ in range(plan.actors)]
        self.worker = self._wait_ready(self.actors)

    def _start_actor(self):
        return ShardActor.options(num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus).remote(
            self.builder, self.args)

    def _wait_ready(self, actors: list) -> dict:
        refs = [a.ready.remote() for a in actors]
        try:
            infos = ray.get(refs, timeout=self.ready_timeout)
        except GetTimeoutError:
            raise ClusterError(
                f"Ray could not start {len(actors)} worker(s) needing {self.plan.describe()} within "
                f"{self.ready_timeout:.0f}s; the cluster offers {ray.cluster_resources()}") from None
        for info in infos:
            if info["error"]:
                raise info["error"]
        return infos[0]

    def run(self, shards: list[str], on_done: Callable[[dict], None] | None = None) -> PoolResult:
        result = PoolResult(worker=self.worker)
        pending = list(reversed(shards))
        attempts: dict[str, int] = {}
        in_flight: dict = {}  # ref -> (actor index, shard)

        def submit(i: int) -> None:
            if pending:
                shard = pending.pop()
                in_flight[self.actors[i].process.remote(shard, self.out)] = (i, shard)

        for i in range(len(self.actors)):
            submit(i)
            submit(i)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            i, shard = in_flight.pop(done[0])
            try:
                stats = ray.get(done[0])
            except RayActorError as err:
                self._on_actor_death(i, shard, attempts, pending, result, err)
            except RayTaskError as err:
                result.failed[shard] = _cause(err)
                log.error("shard %s failed: %s", shard, result.failed[shard])
            else:
                result.stats.append(stats)
                if on_done:
                    on_done(stats)
            submit(i)
        return result

    def _on_actor_death(self, i, shard, attempts, pending, result, err) -> None:
        attempts[shard] = attempts.get(shard, 0) + 1
        if attempts[shard] > self.max_retries:
            result.failed[shard] = f"worker died {attempts[shard]} times: {_cause(err)}"
        else:
            log.warning("worker died on %s; retrying (attempt %d)", shard, attempts[shard] + 1)
            pending.append(shard)
        self.actors[i] = self._start_actor()
        self._wait_ready([self.actors[i]])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def _cause(err: Exception) -> str:
    cause = getattr(err, "cause", None) or err
    lines = [l for l in str(cause).strip().splitlines() if l.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


def run_stage(cfg: RunConfig, out: str, shards: list[str], builder: Callable, args: tuple,
              on_done: Callable[[dict], None] | None = None) -> PoolResult:
    """Process `shards` with `builder(*args)` workers on Ray; returns per-shard stats (starts Ray if needed)."""
    started = connect(cfg.ray)
    try:
        plan = plan_pool(cfg, len(shards))
        log.info("Ray pool: %s for %d shard(s) (%s)", plan.describe(), len(shards), builder.__name__)
        t0 = time.perf_counter()
        pool = ShardPool(builder, args, out, plan, cfg.ray.max_retries_per_shard)
        log.info("workers ready in %.1fs on %s (%s, batch %s)", time.perf_counter() - t0,
                 pool.worker["device"], pool.worker["dtype"], pool.worker["batch_size"])
        try:
            return pool.run(shards, on_done)
        finally:
            pool.close()
    finally:
        if started:
            ray.shutdown()


def embed_shards(cfg: RunConfig, out: str, shards: list[str],
                 on_done: Callable[[dict], None] | None = None) -> PoolResult:
    """The embedding stage: CLIP embeddings and labels for every shard."""
    return run_stage(cfg, out, shards, ShardEmbedder, (cfg.clip, cfg.labels, cfg.compute), on_done)
