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
from collections import Counter, deque
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
        if self.error:
            return {"error": self.error}
        return {"error": None, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                **self.worker.describe()}

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
    retried: list[str] = field(default_factory=list)  # shards re-queued after their worker died
    worker: dict = field(default_factory=dict)


class ShardPool:
    """Hands shards to actors, two in flight per actor, and replaces actors that die.

    A dead actor's shards go back to the queue (up to `max_retries` times each). Its replacement gets a
    short while to start when other actors are alive (a lost node may leave no room for it): the run
    then goes on with fewer actors rather than waiting for capacity that may never come back.
    """

    def __init__(self, builder: Callable, args: tuple, out: str, plan: PoolPlan, max_retries: int,
                 ready_timeout: float = 300.0, replace_timeout: float = 30.0):
        self.builder, self.args, self.out, self.plan = builder, args, out, plan
        self.max_retries, self.ready_timeout, self.replace_timeout = max_retries, ready_timeout, replace_timeout
        actors = [self._start_actor() for _ in range(plan.actors)]
        self.worker = self._wait_ready(actors, self.ready_timeout)
        self.actors = dict(enumerate(actors))  # slot -> live actor handle

    def _start_actor(self):
        return ShardActor.options(num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus).remote(
            self.builder, self.args)

    def _wait_ready(self, actors: list, timeout: float) -> dict:
        try:
            infos = ray.get([a.ready.remote() for a in actors], timeout=timeout)
        except GetTimeoutError:
            for actor in actors:
                ray.kill(actor)
            raise ClusterError(
                f"Ray could not start {len(actors)} worker(s) needing {self.plan.describe()} within "
                f"{timeout:.0f}s; the cluster offers {ray.cluster_resources()}") from None
        for info in infos:
            if info["error"]:
                raise info["error"]
        return infos[0]

    def run(self, shards: list[str], on_done: Callable[[dict], None] | None = None) -> PoolResult:
        result = PoolResult(worker=self.worker)
        pending = deque(shards)
        attempts: Counter = Counter()
        in_flight: dict = {}  # ref -> (slot, actor, shard)

        def fill(slot: int) -> None:
            """Keep two shards queued on the slot's live actor, so it never waits for the driver."""
            actor = self.actors.get(slot)
            while pending and actor is not None and sum(a is actor for _, a, _ in in_flight.values()) < 2:
                shard = pending.popleft()
                in_flight[actor.process.remote(shard, self.out)] = (slot, actor, shard)

        for slot in list(self.actors):
            fill(slot)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            slot, actor, shard = in_flight.pop(done[0])
            try:
                stats = ray.get(done[0])
            except RayActorError as err:
                attempts[shard] += 1
                if attempts[shard] > self.max_retries:
                    result.failed[shard] = f"worker died {attempts[shard]} times: {_cause(err)}"
                else:
                    log.warning("worker died on %s; retrying it (attempt %d)", shard, attempts[shard] + 1)
                    pending.appendleft(shard)
                    result.retried.append(shard)
                if self.actors.get(slot) is actor:  # the first of its failures replaces it
                    self._replace(slot)
            except RayTaskError as err:
                result.failed[shard] = _cause(err)
                log.error("shard %s failed: %s", shard, result.failed[shard])
            else:
                result.stats.append(stats)
                if on_done:
                    on_done(stats)
            for live in list(self.actors):
                fill(live)
            if not in_flight and pending and not self.actors:
                raise ClusterError(f"every worker died and none could be restarted; {len(pending)} shard(s) left")
        return result

    def _replace(self, slot: int) -> None:
        del self.actors[slot]
        actor = self._start_actor()
        timeout = self.replace_timeout if self.actors else self.ready_timeout
        try:
            self._wait_ready([actor], timeout)
        except ClusterError as err:
            if not self.actors:
                raise
            log.warning("could not replace a lost worker (%s); going on with %d", err, len(self.actors))
            return
        self.actors[slot] = actor

    def close(self) -> None:
        for actor in self.actors.values():
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
