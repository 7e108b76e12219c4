"""The index built in parts on Ray (flows/index_build.py): the same index as in one process, a killed part
task redone with the same result, an expected error not retried. A local Ray with 2 CPUs, tiny data."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from index_helpers import clustered, write_shard

from index.build import BuildSpec, load_index, read_meta
from index.parts import add_part, build_in_parts, finish
from shardlight.core.errors import IndexStateError

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DIM = 32
SPEC = BuildSpec("IVF16,Flat,Refine(SQfp16)", nprobe=16, tune_queries=50)  # lists on disk + float16 file


@pytest.fixture(scope="module")
def local_ray():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the failing `add`s below run in Ray workers
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _data(out: Path) -> None:
    for i in range(4):
        write_shard(out, f"{i:05d}", clustered(800, DIM, seed=i))


def _same_index(a: Path, b: Path) -> None:
    queries = clustered(30, DIM, seed=9)
    (ia, ids_a, meta_a), (ib, ids_b, meta_b) = load_index(str(a), mmap=True), load_index(str(b), mmap=True)
    ia.k_factor = ib.k_factor = 8  # tuned from measured speed: compare at one depth
    assert np.array_equal(ia.search(queries, 10)[1], ib.search(queries, 10)[1])
    assert np.array_equal(ia.search(queries, 10)[0], ib.search(queries, 10)[0])
    assert ids_a.equals(ids_b) and meta_a["fingerprint"] == meta_b["fingerprint"]
    vectors = [(out / "index" / m["files"]["vectors"]).read_bytes() for out, m in ((a, meta_a), (b, meta_b))]
    assert vectors[0] == vectors[1]


def _die_once(marker: str, job, number: int) -> dict:
    """Part 1's first attempt kills its worker process halfway (its float16 rows partly written)."""
    if number == 1 and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        part = job.parts[number]
        from index.rerank import write_rows

        write_rows(job.vectors, job.dim, part.first, np.ones((part.rows // 2, job.dim), np.float32))
        os._exit(1)
    return add_part(job, number)


def _refuse(job, number: int) -> dict:
    if number == 2:
        raise IndexStateError("part 2: a file changed")
    return add_part(job, number)


def test_ray_build_gives_the_index_a_build_in_one_process_gives(tmp_path, local_ray):
    from flows.index_build import build_on_ray

    here, there = tmp_path / "sequential", tmp_path / "ray"
    for out in (here, there):
        _data(out)
    build_in_parts(str(here), SPEC, part_rows=800)
    meta = build_on_ray(str(there), SPEC, part_rows=800)
    assert meta["parts"] == {**meta["parts"], "count": 4, "merged": "on disk"}
    _same_index(here, there)


def _finish_elsewhere(marker: str, *args) -> dict:
    """index/parts.py's `finish`, noting the process that ran it."""
    Path(marker).write_text(str(os.getpid()))
    return finish(*args)


def test_the_merge_tuning_and_publish_run_in_a_task_not_the_driver(tmp_path, local_ray):
    from flows.index_build import RayRunner, build_on_ray

    here, there = tmp_path / "sequential", tmp_path / "ray"
    for out in (here, there):
        _data(out)
    build_in_parts(str(here), SPEC, part_rows=800)
    marker = tmp_path / "finished-by"
    meta = build_on_ray(str(there), SPEC, part_rows=800,
                        runner=RayRunner(last=functools.partial(_finish_elsewhere, str(marker))))
    assert int(marker.read_text()) != os.getpid()  # the driver never opened the merged index
    assert meta == read_meta(str(there)) and meta["parts"]["merged"] == "on disk"
    _same_index(here, there)


def test_a_killed_part_task_is_redone_and_the_index_is_the_same(tmp_path, local_ray):
    from flows.index_build import RayRunner, build_on_ray

    here, there = tmp_path / "sequential", tmp_path / "ray"
    for out in (here, there):
        _data(out)
    build_in_parts(str(here), SPEC, part_rows=800)
    marker = str(tmp_path / "killed")
    build_on_ray(str(there), SPEC, part_rows=800, runner=RayRunner(add=functools.partial(_die_once, marker)))
    assert os.path.exists(marker)  # the task did die once
    _same_index(here, there)


def test_an_expected_error_is_not_retried_and_the_previous_index_stays(tmp_path, local_ray):
    from flows.index_build import RayRunner, build_on_ray

    _data(tmp_path)
    before = build_on_ray(str(tmp_path), SPEC, part_rows=800)
    write_shard(tmp_path, "00004", clustered(800, DIM, seed=4))
    with pytest.raises(IndexStateError, match="a file changed"):
        build_on_ray(str(tmp_path), SPEC, part_rows=800, runner=RayRunner(add=_refuse))
    assert read_meta(str(tmp_path)) == before
    assert not [p for p in os.listdir(tmp_path / "index") if p.endswith(".tmp")]


def test_cli_index_parts_builds_on_the_running_ray(tmp_path, local_ray):
    from typer.testing import CliRunner

    from flows.cli import app

    _data(tmp_path)
    result = CliRunner().invoke(app, ["index", str(tmp_path), "--factory", "IVF16,SQ8", "--parts", "--part-rows", "800"])
    assert result.exit_code == 0, result.output
    assert "3200 vectors" in result.output and "4 parts merged on disk" in result.output
    assert "lists" in read_meta(str(tmp_path))["files"]


def test_update_on_ray_adds_parts_like_an_update_in_one_process(tmp_path, local_ray):
    from flows.index_build import build_on_ray, update_on_ray
    from index.update import update_index

    here, there = tmp_path / "sequential", tmp_path / "ray"
    for out in (here, there):
        _data(out)
    build_in_parts(str(here), SPEC, part_rows=800)
    build_on_ray(str(there), SPEC, part_rows=800)
    for out in (here, there):
        write_shard(out, "00004", clustered(500, DIM, seed=4))
        write_shard(out, "00005", clustered(500, DIM, seed=5))
    update_index(str(here), part_rows=500)
    meta = update_on_ray(str(there), part_rows=500)
    assert meta["update"] == {"mode": "added", "added": 1000, "shards": 2} and meta["count"] == 4200
    _same_index(here, there)


def test_a_local_ray_given_num_cpus_bounds_the_drivers_faiss_threads_too(tmp_path, local_ray):
    import faiss

    from flows.index_build import RayRunner, build_on_ray
    from shardlight.core.config import RaySpec

    default = faiss.omp_get_max_threads()
    if default < 2:
        pytest.skip("needs a machine with 2 or more cores")
    seen = []

    class Recording(RayRunner):
        def __call__(self, job, numbers):
            seen.append(faiss.omp_get_max_threads())  # the driver, between training and merging
            return super().__call__(job, numbers)

    _data(tmp_path)
    build_on_ray(str(tmp_path), SPEC, RaySpec(num_cpus=1), part_rows=800, runner=Recording())
    assert seen == [1] and faiss.omp_get_max_threads() == default  # restored after the build
    build_on_ray(str(tmp_path), SPEC, RaySpec(), part_rows=800, runner=Recording())  # no num_cpus: FAISS's default
    assert seen == [1, default]
