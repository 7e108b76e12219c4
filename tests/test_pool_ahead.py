"""Actors started ahead of their stage (workers/pool.py `start_ahead`): the stage's pool is made of them when
they fit, others are left alone and killed by `release_ahead`; the rows are the same either way."""

import time

import pyarrow.parquet as pq
import pytest
import ray
from ray.exceptions import RayActorError

from shardlight.core.config import parse_config
from shardlight.training.synthetic import write_shards
from workers import pool as pool_module
from workers.embed import ShardEmbedder
from workers.pool import release_ahead, run_stage, start_ahead

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# One CPU per actor, so an unclaimed actor started ahead leaves room for the stage's own on 2 CPUs.
CFG = parse_config({"clip": {"model": "shapes-clip"}, "labels": {"kind": "none"}, "compute": {"batch_size": 16},
                    "ray": {"num_actors": 1, "cpus_per_actor": 1}})
ARGS = (CFG.clip, CFG.labels, CFG.compute)


@pytest.fixture
def local_ray():
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    release_ahead()
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return [str(p) for p in write_shards(tmp_path_factory.mktemp("ahead"), 2, 24, seed=17)]


def rows(out) -> dict:
    return {p.name: pq.read_table(p, columns=["key", "image_embedding"]) for p in sorted(out.glob("embeddings/*.parquet"))}


def test_the_stage_runs_on_the_actor_started_ahead(tmp_path, local_ray, shards):
    plan = start_ahead(CFG, len(shards), ShardEmbedder, ARGS)
    assert plan.actors == 1 and len(pool_module._AHEAD) == 1
    ahead = ray.get(pool_module._AHEAD[0].ready)  # it starts (loads its models) before any stage asks for it

    result = run_stage(CFG, str(tmp_path / "ahead"), shards, ShardEmbedder, ARGS)

    assert result.worker["pid"] == ahead["pid"]  # the stage's worker is that actor, not a new one
    assert pool_module._AHEAD == [] and release_ahead() == 0
    assert not result.failed and sum(s["rows"] for s in result.stats) == 48
    # and what it wrote equals what a pool started by the stage itself writes
    plain = run_stage(CFG, str(tmp_path / "plain"), shards, ShardEmbedder, ARGS)
    assert plain.worker["pid"] != ahead["pid"]
    got, want = rows(tmp_path / "ahead"), rows(tmp_path / "plain")
    assert list(got) == ["00000.parquet", "00001.parquet"] and all(got[k].equals(want[k]) for k in want)


def test_an_actor_for_other_arguments_is_not_claimed_and_is_released(tmp_path, local_ray, shards):
    other = parse_config({**CFG.model_dump(), "compute": {"batch_size": 8}})
    start_ahead(other, 1, ShardEmbedder, (other.clip, other.labels, other.compute))
    stranger = pool_module._AHEAD[0]
    stranger_pid = ray.get(stranger.ready)["pid"]

    result = run_stage(CFG, str(tmp_path / "out"), shards[:1], ShardEmbedder, ARGS)

    assert result.worker["pid"] != stranger_pid and result.worker["batch_size"] == 16
    assert pool_module._AHEAD == [stranger]  # still there, still alive, until released
    assert ray.get(stranger.actor.ready.remote())["pid"] == stranger_pid
    assert release_ahead() == 1 and pool_module._AHEAD == []
    # ray.kill is asynchronous: a call sent right after it may still be served (seen in CI); within a minute
    # the actor must be gone
    deadline = time.monotonic() + 60
    with pytest.raises(RayActorError):
        while time.monotonic() < deadline:
            ray.get(stranger.actor.ready.remote(), timeout=60)
            time.sleep(0.2)
