"""Benchmarks refuse to report a rate over work that did not finish."""

import re

import pytest

from shardlight.core.config import parse_config
from workers.pool import PoolPlan, PoolResult

scale = pytest.importorskip("bench.scale")

CFG = parse_config({"clip": {"model": "shapes-clip"}, "labels": {"kind": "none"}})
PLAN = PoolPlan(actors=1, num_cpus=1.0, num_gpus=0, min_ready=1)


def pool_returning(result: PoolResult):
    class Pool:  # stands in for the Ray pool: only what measure() calls
        def __init__(self, *args, **kw):
            pass

        def run(self, shards):
            return result

        def close(self):
            pass

    return Pool


@pytest.mark.parametrize("result, message", [
    (PoolResult(stats=[{"rows": 256}], failed={"/d/00001.tar": "OSError: disk gone"}),
     "1 actor(s), 1 CPU each: 1 of 2 shard(s) finished; failed: /d/00001.tar: OSError: disk gone"),
    (PoolResult(stats=[{"rows": 256}]), "1 of 2 shard(s) finished"),  # lost without a reason
])
def test_scale_fails_loudly_on_unfinished_shards(monkeypatch, tmp_path, result, message):
    monkeypatch.setattr(scale, "ShardPool", pool_returning(result))
    with pytest.raises(scale.IncompleteRun, match=re.escape(message)):
        scale.measure(CFG, ["/d/00000.tar", "/d/00001.tar"], tmp_path, PLAN)


def test_scale_reports_a_rate_when_every_shard_finished(monkeypatch, tmp_path):
    monkeypatch.setattr(scale, "ShardPool", pool_returning(PoolResult(stats=[{"rows": 256}, {"rows": 256}])))
    assert scale.measure(CFG, ["/d/00000.tar", "/d/00001.tar"], tmp_path, PLAN) > 0
