"""Faults on a real 2-node local Ray cluster: every row exactly once, whatever dies."""

import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray

from shardlight.core.config import parse_config
from shardlight.training.synthetic import write_shards
from tests.conftest import tar_keys
from workers.embed import ShardEmbedder
from workers.pool import PoolPlan, ShardPool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CFG = parse_config({"clip": {"model": "shapes-clip"}, "labels": {"kind": "none"}, "compute": {"batch_size": 16}})


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker_node = c.add_node(num_cpus=1)
    ray.init(address=c.address)
    c.wait_for_nodes()
    yield c, worker_node
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return [str(p) for p in write_shards(tmp_path_factory.mktemp("faults"), 6, 160, seed=31)]


def start_pool(out, actors, replace_timeout=30.0):
    plan = PoolPlan(actors=actors, num_cpus=1, num_gpus=0, min_ready=actors)
    return ShardPool(ShardEmbedder, (CFG.clip, CFG.labels, CFG.compute), str(out), plan, max_retries=2,
                     replace_timeout=replace_timeout)


def tables(out) -> dict:
    return {p.name: pq.read_table(p) for p in sorted((out / "embeddings").glob("*.parquet"))}


_CLEAN: dict = {}


def clean_tables(shards, tmp_path_factory) -> dict:
    """The same shards through an undisturbed pool (run once per module): what a faulty run must equal."""
    if not _CLEAN:
        out = tmp_path_factory.mktemp("clean")
        pool = start_pool(out, actors=2)
        result = pool.run(shards)
        pool.close()
        assert not result.failed and not result.retried
        _CLEAN.update(tables(out))
    return _CLEAN


def assert_equals_clean_run(shards, out, tmp_path_factory):
    """Every row exactly once, in order, with the same values as a run nothing happened to."""
    clean, got = clean_tables(shards, tmp_path_factory), tables(out)
    assert list(got) == list(clean) == [f"{i:05d}.parquet" for i in range(len(shards))]
    for name, table in clean.items():
        assert got[name].equals(table), name
    for shard in shards:  # and the rows are the shard's samples, as an independent tar listing sees them
        name = shard.rsplit("/", 1)[-1].removesuffix(".tar")
        assert got[f"{name}.parquet"].column("key").to_pylist() == tar_keys(shard)


def on_first_parquet(out, action, timeout: float = 300.0) -> threading.Thread:
    """Run `action` as soon as the first shard's Parquet appears: mid-run on any machine, whatever its speed."""
    def watch():
        deadline = time.monotonic() + timeout
        while not list((out / "embeddings").glob("*.parquet")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_killed_worker_mid_shard_is_retried(cluster, shards, tmp_path, tmp_path_factory):
    clean_tables(shards, tmp_path_factory)  # first, while the cluster is whole
    pool = start_pool(tmp_path, actors=2)
    victim = ray.get(pool.actors[0].ready.remote())["pid"]
    # At the first finished shard every actor still holds work (two in flight each, more queued): the kill
    # always lands mid-shard.
    killer = on_first_parquet(tmp_path, lambda: os.kill(victim, signal.SIGKILL))
    result = pool.run(shards)
    killer.join()
    pool.close()
    assert result.retried, "the killed worker's shards were re-queued"
    assert not result.failed and len(result.stats) == len(shards)
    assert_equals_clean_run(shards, tmp_path, tmp_path_factory)


def test_lost_node_mid_run_completes_on_the_other(cluster, shards, tmp_path, tmp_path_factory):
    c, worker_node = cluster
    clean_tables(shards, tmp_path_factory)  # first, while the cluster is whole
    pool = start_pool(tmp_path, actors=2, replace_timeout=5.0)
    nodes = {ray.get(a.ready.remote())["node"] for a in pool.actors.values()}
    assert len(nodes) == 2, "one actor per node"
    remover = on_first_parquet(tmp_path, lambda: c.remove_node(worker_node))
    result = pool.run(shards)
    remover.join()
    pool.close()
    assert result.retried and not result.failed
    assert_equals_clean_run(shards, tmp_path, tmp_path_factory)


def test_pool_starts_with_min_actors_and_late_ones_join(cluster, shards, tmp_path):
    """Three actors asked for on two 1-CPU nodes: work starts with two; the third never fits and is dropped."""
    plan = PoolPlan(actors=3, num_cpus=1, num_gpus=0, min_ready=2)
    pool = ShardPool(ShardEmbedder, (CFG.clip, CFG.labels, CFG.compute), str(tmp_path), plan, max_retries=2)
    assert len(pool.actors) == 2 and len(pool.starting) == 1
    result = pool.run(shards[:3])
    pool.close()
    assert not result.failed and len(result.stats) == 3
    for shard in shards[:3]:
        name = shard.rsplit("/", 1)[-1].removesuffix(".tar")
        assert pq.read_table(tmp_path / "embeddings" / f"{name}.parquet").column("key").to_pylist() == tar_keys(shard)


def test_no_room_for_any_worker_is_one_clear_error(cluster, tmp_path):
    from shardlight.core.errors import ClusterError

    plan = PoolPlan(actors=1, num_cpus=4, num_gpus=0)  # no node has 4 CPUs
    with pytest.raises(ClusterError, match=r"could not start 1 worker\(s\) needing 1 actor\(s\), 4 CPU each within 3s"):
        ShardPool(ShardEmbedder, (CFG.clip, CFG.labels, CFG.compute), str(tmp_path), plan, max_retries=0,
                  ready_timeout=3)
