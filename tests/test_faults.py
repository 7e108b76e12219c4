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
from workers.embed import ShardEmbedder
from workers.pool import PoolPlan, ShardPool
from workers.reader import RawSample, ShardReader

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


def assert_every_row_exactly_once(shards, out):
    for shard in shards:
        expected = [s.key for s in ShardReader(shard) if isinstance(s, RawSample)]
        name = shard.rsplit("/", 1)[-1].removesuffix(".tar")
        keys = pq.read_table(f"{out}/embeddings/{name}.parquet", columns=["key"]).column("key").to_pylist()
        assert keys == expected  # all rows, in order, none twice


def later(seconds, action):
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_killed_worker_mid_shard_is_retried(cluster, shards, tmp_path):
    pool = start_pool(tmp_path, actors=2)
    victim = ray.get(pool.actors[0].ready.remote())["pid"]
    killer = later(1.0, lambda: os.kill(victim, signal.SIGKILL))
    result = pool.run(shards)
    killer.join()
    pool.close()
    assert result.retried, "the killed worker's shards were re-queued"
    assert not result.failed and len(result.stats) == len(shards)
    assert_every_row_exactly_once(shards, tmp_path)


def test_lost_node_mid_run_completes_on_the_other(cluster, shards, tmp_path):
    c, worker_node = cluster
    pool = start_pool(tmp_path, actors=2, replace_timeout=5.0)
    nodes = {ray.get(a.ready.remote())["node"] for a in pool.actors.values()}
    assert len(nodes) == 2, "one actor per node"
    remover = later(1.0, lambda: c.remove_node(worker_node))
    result = pool.run(shards)
    remover.join()
    pool.close()
    assert result.retried and not result.failed
    assert_every_row_exactly_once(shards, tmp_path)


def test_pool_starts_with_min_actors_and_late_ones_join(cluster, shards, tmp_path):
    """Three actors asked for on two 1-CPU nodes: work starts with two; the third never fits and is dropped."""
    plan = PoolPlan(actors=3, num_cpus=1, num_gpus=0, min_ready=2)
    pool = ShardPool(ShardEmbedder, (CFG.clip, CFG.labels, CFG.compute), str(tmp_path), plan, max_retries=2)
    assert len(pool.actors) == 2 and len(pool.starting) == 1
    result = pool.run(shards[:3])
    pool.close()
    assert not result.failed and len(result.stats) == 3
    assert_every_row_exactly_once(shards[:3], tmp_path)


def test_no_room_for_any_worker_is_one_clear_error(cluster, tmp_path):
    from shardlight.core.errors import ClusterError

    plan = PoolPlan(actors=1, num_cpus=4, num_gpus=0)  # no node has 4 CPUs
    with pytest.raises(ClusterError, match=r"could not start 1 worker\(s\) needing 1 actor\(s\), 4 CPU each within 3s"):
        ShardPool(ShardEmbedder, (CFG.clip, CFG.labels, CFG.compute), str(tmp_path), plan, max_retries=0,
                  ready_timeout=3)
