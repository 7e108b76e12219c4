"""Build (or update) the FAISS index in parts on Ray: the driver trains once, Ray tasks add the parts.

    >>> from flows.index_build import build_on_ray
    >>> build_on_ray("out", BuildSpec(factory="auto"), RaySpec(num_cpus=2))   # a local Ray with 2 CPUs

The steps are index/parts.py's; this module only runs `add_part` as Ray tasks on the run's cluster (the
configured `ray.address`, else a local Ray with `ray.num_cpus`), because index/ never imports Ray (import
contract 4, docs/architecture.md). Each task adds one group of Parquet files to a copy of the trained empty
index with their global ids and writes its part to OUT's filesystem (every node must mount it); only the small
exact top-k of the tuning queries comes back. A part task whose process dies is rerun by Ray (`max_retries`),
and an error raised inside it is retried as well unless it is a `ShardlightError` (a changed file will not fix
itself): a part redone writes the same bytes, so the index is the same. Progress is logged as parts finish.
One last task merges the parts, tunes and publishes, so the driver holds only the training sample and never
maps the index's files.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import ray
from ray.exceptions import RayError, RayTaskError

from index.build import BuildSpec, Trained
from index.parts import PART_ROWS, PartsJob, add_part, build_in_parts, finish
from index.update import update_index
from shardlight.core.config import RaySpec
from shardlight.core.errors import ClusterError, ShardlightError, last_line
from workers.pool import connect

log = logging.getLogger("shardlight")

TASK_RETRIES = 3  # reruns of a part whose task failed or whose process died
RETRIED = (OSError, RuntimeError, MemoryError)  # errors worth another try (not ShardlightError: see below)


@ray.remote
def _add_part_task(job: PartsJob, number: int, threads: int, add: Callable[[PartsJob, int], dict]) -> dict:
    faiss.omp_set_num_threads(threads)  # Ray's OMP_NUM_THREADS would be the task's CPUs anyway; say it
    try:
        return add(job, number)
    except ShardlightError as err:  # not retried: carried to the driver as the same one-line error
        return {"number": number, "error": err}


@ray.remote
def _call_task(fn: Callable, *args):
    return fn(*args)


@ray.remote
def _finish_task(threads: int, last: Callable[..., dict], *args) -> tuple[dict, float, str]:
    faiss.omp_set_num_threads(threads)
    meta = last(*args)
    return meta, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, ray.get_runtime_context().get_node_id()


@dataclass
class RayRunner:
    """Runs `add_part` for every part as a Ray task (`cpus` each), at most as many at once as the cluster has
    room for; the results come back in any order."""

    cpus: float = 1.0
    retries: int = TASK_RETRIES
    add: Callable[[PartsJob, int], dict] = add_part  # what a part task runs (tests inject failures here)
    last: Callable[..., dict] = finish  # what the last task runs (`finish`'s arguments)

    def __call__(self, job: PartsJob, numbers: list[int]) -> list[dict]:
        job_ref = ray.put(job)
        task = _add_part_task.options(num_cpus=self.cpus, max_retries=self.retries,
                                      retry_exceptions=list(RETRIED))
        pending = {task.remote(job_ref, n, max(1, int(self.cpus)), self.add): n for n in numbers}
        results, start = [], time.perf_counter()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                number = pending.pop(done[0])
                results.append(self._result(done[0], number))
                log.info("index part %d done (%d/%d, %s rows, %.1fs in the task, %.0fs so far)", number, len(results),
                         len(numbers), f"{results[-1]['rows']:,}", results[-1]["seconds"], time.perf_counter() - start)
        except BaseException:
            _cancel(list(pending))  # nothing may still write into the work folder the driver removes
            raise
        return results

    @property
    def width(self) -> int:
        """Tasks of `cpus` each that the cluster runs at once."""
        return max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus))

    def finish(self, out: str, spec: BuildSpec, job: PartsJob, t: Trained, results: list[dict], add_s: float) -> dict:
        """index/parts.py's `finish` (merge, tune, publish) as one task holding the CPUs of the cluster's largest
        node, so the driver never maps the index's files. Not retried: a publish cut short has moved some files
        into place, and the build is redone from the start (the previous index serves meanwhile)."""
        cpus = max([n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] + [1.0])
        task = _finish_task.options(num_cpus=cpus, max_retries=0)
        meta, peak_mib, node = self._get(task.remote(max(1, int(cpus)), self.last, out, spec, job, t, results, add_s),
                                         "merging, tuning and publishing the index")
        log.info("index merged, tuned and published by one task (%g CPUs, node %s, its process's peak RSS %.0f MiB)",
                 cpus, node[:12], peak_mib)
        return meta

    def map_groups(self, fn: Callable, jobs: list[tuple]) -> list:
        """`[fn(*job) for job in jobs]`, each a task of `cpus` (the index's sample pass: index/vectors.py)."""
        task = _call_task.options(num_cpus=self.cpus, max_retries=self.retries, retry_exceptions=list(RETRIED))
        return self._get([task.remote(fn, *job) for job in jobs], "reading the index's sample")

    def _result(self, ref, number: int) -> dict:
        result = self._get(ref, f"index part {number}")
        if result.get("error") is not None:
            raise result["error"]
        return result

    def _get(self, refs, what: str):
        """`ray.get(refs)`, a task that failed or was lost told as one line naming `what`."""
        try:
            return ray.get(refs)
        except RayTaskError as err:
            raise ClusterError(f"{what} failed after {self.retries} retries: {last_line(err)[:300]}") from None
        except RayError as err:
            raise ClusterError(f"{what} was lost: {last_line(err)[:300]}") from None


def _cancel(refs: list, wait_s: float = 30.0) -> None:
    for ref in refs:
        ray.cancel(ref, force=True, recursive=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=wait_s)


@contextmanager
def _on_ray(ray_spec: RaySpec) -> Iterator[None]:
    """Ray up for the build (a local one started, and shut down after, when none is configured or running).

    On a local Ray given `ray.num_cpus`, the driver's own FAISS work (training, merging, tuning) uses that many
    threads too: the setting bounds the whole build on this machine, not only its part tasks. A driver that
    joins a cluster keeps FAISS's default (its machine is not the cluster's CPUs).
    """
    started = connect(ray_spec)
    local = (ray_spec.address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    threads = faiss.omp_get_max_threads()
    if local and ray_spec.num_cpus:
        faiss.omp_set_num_threads(max(1, min(ray_spec.num_cpus, threads)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
        if started:
            ray.shutdown()


def build_on_ray(out: str, spec: BuildSpec, ray_spec: RaySpec = RaySpec(), part_rows: int = PART_ROWS,
                 runner: RayRunner | None = None) -> dict:
    """Build OUT's index in parts on Ray (starting a local Ray when none is configured or running)."""
    with _on_ray(ray_spec):
        return build_in_parts(out, spec, part_rows, runner or RayRunner())


def update_on_ray(out: str, ray_spec: RaySpec = RaySpec(), part_rows: int = PART_ROWS,
                  runner: RayRunner | None = None, **update_kwargs) -> dict:
    """`update_index` with its parts (and any rebuild) on Ray."""
    with _on_ray(ray_spec):
        return update_index(out, runner=runner or RayRunner(), part_rows=part_rows, **update_kwargs)
