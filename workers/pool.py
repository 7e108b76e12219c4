"""A pool of Ray actors that process shards: sized to the cluster, retrying shards whose actor died.

The driver ships a builder (a shard-worker class) and its constructor arguments (specs), never models;
each actor builds its worker once and then calls `worker.process(shard_url, out) -> stats` per shard,
writing the shard's outputs itself and returning only small stats. Any class with `describe()` and
`process()` can be a shard worker; the pool is handed it and names none.

Actors may be started ahead of their stage (`start_ahead`), so that loading their models overlaps whatever
the driver does meanwhile (importing, starting the orchestrator); a stage's pool takes those actors first
when their worker, arguments and resources are the ones it needs, and `release_ahead` kills any left over.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from shardlight.core.config import RaySpec, RunConfig
from shardlight.core.errors import ClusterError, ShardlightError, first_line, last_line

log = logging.getLogger("shardlight")

CLOSE_TIMEOUT_S = 10.0  # for live actors to shut down their helper processes before they are killed


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

    def close(self) -> None:
        close = getattr(self.worker, "close", None)
        if close is not None:
            close()


# Ray 2.60's `ray start --head` turns on token authentication; a client without the token is refused with
# InvalidAuthToken warnings and a connection error that never mentions it.
AUTH_HINT = ("if the cluster uses token authentication (the default of `ray start` since Ray 2.60), set "
             "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the head's ~/.ray/auth_token via "
             "RAY_AUTH_TOKEN_PATH): see docs/cluster.md")


def connect(spec: RaySpec) -> bool:
    """Join the configured cluster or start a local Ray; returns True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address == "local":
        kwargs["num_cpus"] = spec.num_cpus
        # Ray starts its workers at nice 15, so the model threads lose the cores to every other process (the
        # Prefect server, the driver's progress bar) and stall at each parallel region's barrier; the worker's
        # decode processes already yield to them (workers/decode_job.py). docs/cluster.md for `ray start`.
        kwargs["_system_config"] = {"worker_niceness": 0}
        # "Token authentication is enabled for this Ray cluster…": news for a cluster's operator, noise that
        # breaks the progress bar for a private local Ray.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, RayError) as err:
        hint = "" if address == "local" else f"; {AUTH_HINT}"
        raise ClusterError(f"cannot reach Ray at {address!r}: {first_line(err, with_type=False)[:300]}{hint}") from None
    return True


@dataclass
class PoolPlan:
    actors: int  # actors asked for
    num_cpus: float  # per actor
    num_gpus: float  # per actor
    min_ready: int = 1  # actors that must be up before work starts

    def describe(self) -> str:
        each = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return f"{self.actors} actor(s), {each} each"


def plan_pool(cfg: RunConfig, shards: int) -> PoolPlan:
    """One actor per GPU when the cluster has GPUs; otherwise CPU actors of two CPUs each (`cpu_share`).

    With `ray.cpus_per_actor` unset an actor asks Ray for the CPUs it will really use (it sets its torch
    threads and decode workers from that share), so Ray's accounting is what keeps several actors on one
    node from oversubscribing it.
    """
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    use_gpu = gpus > 0 and cfg.compute.device != "cpu" and cfg.ray.gpus_per_actor > 0
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if use_gpu:
        wanted = cfg.ray.num_actors or max(1, int(gpus / cfg.ray.gpus_per_actor))
        gpu_each = cfg.ray.gpus_per_actor
        cpu_each = cfg.ray.cpus_per_actor or gpu_share(nodes, gpu_each)
    else:
        auto_actors, auto_cpus = cpu_share([int(n.get("CPU", 0)) for n in nodes])
        wanted = cfg.ray.num_actors or (max(1, int(cpus // 2)) if cfg.ray.cpus_per_actor else auto_actors)
        if cfg.ray.num_actors and not cfg.ray.cpus_per_actor:  # as many actors as asked, sharing the CPUs
            auto_cpus = min(auto_cpus, max(cpus / cfg.ray.num_actors, 0.01))
        gpu_each, cpu_each = 0.0, cfg.ray.cpus_per_actor or auto_cpus
    if cfg.ray.num_actors is None:
        wanted = max(wanted, cfg.ray.min_actors)
        wanted = min(wanted, cfg.ray.max_actors or wanted)
    actors = max(1, min(wanted, shards))
    return PoolPlan(actors=actors, num_cpus=cpu_each + cfg.ray.decode_cpus, num_gpus=gpu_each,
                    min_ready=min(cfg.ray.min_actors, actors))


def cpu_share(node_cpus: list[int]) -> tuple[int, int]:
    """(actors, CPUs each) for CPU actors: two CPUs each (one on 1-CPU nodes); a lone node's odd CPU goes
    to its actors (3 CPUs: one actor with three)."""
    node_cpus = [c for c in node_cpus if c >= 1] or [1]
    each = max(1, min(2, min(node_cpus)))
    actors = max(1, sum(c // each for c in node_cpus))
    if len(node_cpus) == 1:
        each = max(each, node_cpus[0] // actors)
    return actors, each


def gpu_share(nodes: list[dict], gpus_each: float) -> float:
    """CPUs for a GPU actor: its share of the CPUs of the leanest GPU node (they decode its images)."""
    shares = [n["CPU"] * gpus_each / n["GPU"] for n in nodes if n.get("GPU", 0) > 0 and n.get("CPU", 0) > 0]
    return float(max(1, math.floor(min(shares)))) if shares else 1.0


@dataclass
class _StartedAhead:
    builder: Callable
    args: tuple
    resources: tuple[float, float]  # (CPUs, GPUs) per actor
    actor: object
    ready: object  # the actor's ready() ref, already asked for


_AHEAD: list[_StartedAhead] = []


def start_ahead(cfg: RunConfig, shards: int, builder: Callable, args: tuple) -> PoolPlan:
    """Start the actors a stage over `shards` shards will want, now, without waiting for them; Ray must be up.

    The stage's pool claims them (`ShardPool`), so their start-up (process, imports, model loading) runs
    while the driver goes on; an actor whose start fails reports it when claimed, as one started then would.
    """
    plan = plan_pool(cfg, shards)
    for _ in range(plan.actors):
        actor = ShardActor.options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus).remote(builder, args)
        _AHEAD.append(_StartedAhead(builder, args, (plan.num_cpus, plan.num_gpus), actor, actor.ready.remote()))
    return plan


def _claim_ahead(builder: Callable, args: tuple, plan: PoolPlan) -> _StartedAhead | None:
    for i, ahead in enumerate(_AHEAD):
        if ahead.builder is builder and ahead.args == args and ahead.resources == (plan.num_cpus, plan.num_gpus):
            return _AHEAD.pop(i)
    return None


def release_ahead() -> int:
    """Kill the actors started ahead that no stage claimed; returns how many."""
    count = 0
    while _AHEAD:
        ahead = _AHEAD.pop()
        if ray.is_initialized():
            ray.kill(ahead.actor)
        count += 1
    return count


@dataclass
class PoolResult:
    stats: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard url -> reason
    retried: list[str] = field(default_factory=list)  # shards re-queued after their worker died
    worker: dict = field(default_factory=dict)
    startup_s: float = 0.0  # from the stage's call until its first worker was ready (Ray, actors, models)
    work_s: float = 0.0  # from then until the last shard's result came back (not the workers' shutdown)


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
        self.actors: dict[int, object] = {}  # slot -> live actor handle
        self.starting: dict = {}  # ready() ref -> actor still waiting for resources (autoscaling)
        self.worker = self._start(plan.actors, plan.min_ready, ready_timeout)

    def _start_actor(self):
        return ShardActor.options(num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus).remote(
            self.builder, self.args)

    def _start(self, count: int, needed: int, timeout: float) -> dict:
        """Start `count` actors; return once `needed` are up, leaving the rest to join when placed."""
        refs = {}
        for _ in range(count):
            ahead = _claim_ahead(self.builder, self.args, self.plan)
            actor = ahead.actor if ahead else self._start_actor()
            refs[ahead.ready if ahead else actor.ready.remote()] = actor
        ready, waiting = ray.wait(list(refs), num_returns=needed, timeout=timeout)
        if len(ready) < needed:
            for actor in refs.values():
                ray.kill(actor)
            raise ClusterError(
                f"Ray could not start {needed} worker(s) needing {self.plan.describe()} within {timeout:.0f}s; "
                f"the cluster offers {ray.cluster_resources()}")
        self.starting.update({ref: refs[ref] for ref in waiting})
        infos = [self._join(ref, refs[ref]) for ref in ready]
        return infos[0]

    def _join(self, ref, actor) -> dict:
        info = ray.get(ref)
        if info["error"]:
            ray.kill(actor)
            raise info["error"]
        self.actors[max(self.actors, default=-1) + 1] = actor
        return info

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
        while in_flight or (pending and self.starting):
            timeout = None if in_flight else self.ready_timeout  # only late actors left to wait for
            done, _ = ray.wait(list(in_flight) + list(self.starting), num_returns=1, timeout=timeout)
            if not done:
                break
            if done[0] in self.starting:  # a late actor got its resources: put it to work
                self._join(done[0], self.starting.pop(done[0]))
                for live in list(self.actors):
                    fill(live)
                continue
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
        if pending:
            raise ClusterError(f"no worker left and none could be started; {len(pending)} shard(s) not processed")
        return result

    def _replace(self, slot: int) -> None:
        del self.actors[slot]
        timeout = self.replace_timeout if self.actors else self.ready_timeout
        try:
            self._start(1, 1, timeout)
        except ClusterError as err:
            if not self.actors:
                raise
            log.warning("could not replace a lost worker (%s); going on with %d", err, len(self.actors))

    def close(self) -> None:
        """Stop the workers: each live actor first shuts down its helper processes, then every actor is killed.

        Ray kills a killed actor's whole process group; a decode pool cut down that way can leave Python's
        resource tracker gone while the pool still unregisters its semaphores, which prints a KeyError
        traceback per semaphore into the run's log.
        """
        closing = [actor.close.remote() for actor in self.actors.values()]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for actor in [*self.actors.values(), *self.starting.values()]:
            ray.kill(actor)


def _cause(err: Exception) -> str:
    return last_line(getattr(err, "cause", None) or err)[:300]


def run_stage(cfg: RunConfig, out: str, shards: list[str], builder: Callable, args: tuple,
              on_done: Callable[[dict], None] | None = None,
              on_ready: Callable[[], None] | None = None) -> PoolResult:
    """Process `shards` with `builder(*args)` workers on Ray; returns per-shard stats (starts Ray if needed).
    `on_ready()` is called once the first worker is up, before any shard is handed out."""
    t0 = time.perf_counter()
    started = connect(cfg.ray)
    try:
        plan = plan_pool(cfg, len(shards))
        log.info("Ray pool: %s for %d shard(s) (%s)", plan.describe(), len(shards), builder.__name__)
        pool = ShardPool(builder, args, out, plan, cfg.ray.max_retries_per_shard, cfg.ray.start_timeout_s)
        up = time.perf_counter()
        log.info("workers ready in %.1fs on %s (%s, batch %s)", up - t0,
                 pool.worker["device"], pool.worker["dtype"], pool.worker["batch_size"])
        if on_ready:
            on_ready()
        try:
            result = pool.run(shards, on_done)
            result.startup_s, result.work_s = round(up - t0, 3), round(time.perf_counter() - up, 3)
            return result
        finally:
            pool.close()
    finally:
        if started:
            ray.shutdown()

