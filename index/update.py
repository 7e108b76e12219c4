"""Add new shards' embeddings to an existing index without retraining it.

    >>> from index.update import update_index
    >>> update_index("out")                          # adds OUT/embeddings files the index has not seen
    >>> update_index("out", rebuild_on_drift=True)   # retrains when the new data fits the quantizer badly

New vectors are encoded with the index's trained quantizer and appended, and the id map is extended,
so the result answers exactly as a rebuild that kept the same quantizer (and, for Flat, exactly as any
rebuild). A shard whose embeddings were rewritten or removed forces a full rebuild. Drift is the ratio
of the new vectors' quantization error to the error measured on held-out vectors at build time.

Search speed (`tuning.qps`, `tuning.latency_ms_p50`) is measured again after every add, on new vectors as
queries, at the grown size (`tuning.speed_count`); recall needs an exact pass over every vector, so it is
not: `tuning.recall_count` says how many vectors the index held when its recall was measured.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import UTC, datetime

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.build import BuildSpec, add_all, build_index, quantization_error, removed_on_error
from index.parts import PART_ROWS, PartsJob, Runner, build_in_parts, cleaned_up, in_parts, merge, sequential, split, work_folder
from index.rerank import Float16Writer, attach, copy_rows, create, detach, open_vectors
from index.store import INDEX_DIR, file_names, includes_synthetic, load_index, read_meta, save, vectors_workfile
from index.tune import apply_tuning, timed_search
from index.vectors import file_name, fingerprint, index_files, num_rows, sample, signature
from shardlight.core.storage import join, local_path

log = logging.getLogger("shardlight")

DRIFT_TOLERANCE = 1.25  # new data's quantization error over the build-time error that calls for a rebuild
DRIFT_SAMPLE = 2000  # new vectors used to measure drift


def _total(error: dict) -> float:
    return float(error.get("coarse", 0.0)) + float(error.get("codec", 0.0))


def _rebuild(out: str, meta: dict | None, reason: str, runner: Runner | None = None, part_rows: int = PART_ROWS,
             **build_kwargs) -> dict:
    log.info("rebuilding the index: %s", reason)
    kwargs = {"factory": (meta or {}).get("requested_factory", (meta or {}).get("factory", "Flat")),
              "model": (meta or {}).get("model") or None, **build_kwargs}
    if runner is not None and in_parts(out, kwargs["factory"]):
        built = build_in_parts(out, BuildSpec(**kwargs), part_rows, runner)
    else:
        built = build_index(out, **kwargs)
    return {**built, "update": {"mode": "rebuilt", "reason": reason}}


def update_index(out: str, *, rebuild_on_drift: bool = False, drift_tolerance: float = DRIFT_TOLERANCE,
                 synthetic: bool | None = None, runner: Runner | None = None, part_rows: int = PART_ROWS,
                 **build_kwargs) -> dict:
    """Bring OUT/index up to date with OUT/embeddings, adding new shards incrementally.

    Args:
        out: the run's output folder or URL.
        rebuild_on_drift: rebuild (retrain) instead of adding when the new data has drifted.
        drift_tolerance: quantization-error ratio above which the data counts as drifted.
        synthetic: index the generated rows too (True) or not (False); None keeps the index's choice.
            Changing it rebuilds.
        runner: adds parts (index/parts.py) for an index whose lists live on disk, and rebuilds in parts; None
            adds them in this process and rebuilds with `build_index`.
        part_rows: rows per part.
        **build_kwargs: passed to `build_index` when a rebuild is needed.

    Returns the index metadata; its `update` entry says what was done and `drift` what was measured.
    """
    meta = read_meta(out, missing_ok=True)
    was = includes_synthetic(meta) if meta else True
    synthetic = was if synthetic is None else synthetic
    build_kwargs |= {"synthetic": synthetic, "runner": runner, "part_rows": part_rows}
    files = index_files(out, synthetic)
    if meta is None:
        return {**_rebuild(out, meta, "there was no index", **build_kwargs), "update": {"mode": "built"}}
    if synthetic != was:
        return _rebuild(out, meta, "generated rows are now " + ("included" if synthetic else "excluded"),
                        **build_kwargs)
    if not meta.get("inputs"):
        return _rebuild(out, meta, "the index predates recorded input lists", **build_kwargs)
    current = {file_name(u): u for u in files}
    known = {sig.rsplit(":", 2)[0]: sig for sig in meta["inputs"]}
    changed = sorted(n for n, sig in known.items() if n not in current or signature(current[n]) != sig)
    if changed:
        return _rebuild(out, meta, f"{len(changed)} indexed shard(s) changed or disappeared ({changed[0]}, …)",
                        **build_kwargs)
    new = [current[n] for n in sorted(current) if n not in known]
    if not new:
        return {**meta, "update": {"mode": "unchanged", "added": 0}}
    start = time.perf_counter()
    index, ids, _ = load_index(out)
    _, probe, probe_rows = sample(new, 0, DRIFT_SAMPLE)
    drift = _drift(index, meta, probe, drift_tolerance)
    if drift["drifted"] and rebuild_on_drift:
        return _rebuild(out, meta, f"data drifted (quantization error ×{drift['ratio']:.2f})", **build_kwargs)
    before = int(index.ntotal)
    if "trained" in meta["files"]:  # built in parts: updated in parts
        updated = _add_parts(out, index, ids, meta, new, files, drift, start, runner or sequential, part_rows,
                             (probe, probe_rows + before))
    else:
        index, vectors, added = _add(out, index, new, fingerprint(files), meta)
        updated = _updated_meta(meta, files, index, drift, len(new), time.perf_counter() - start)
        updated["tuning"] = _speed_after_add(index, meta, probe, probe_rows + before)
        save(out, index, pa.concat_tables([ids, added]), updated, {"vectors": vectors} if vectors else None)
    if drift["drifted"]:
        log.warning("new data fits the index's quantizer %.2f× worse than at build time: consider a rebuild "
                    "(`shardlight index-update %s --rebuild-on-drift` or `shardlight index %s`)",
                    drift["ratio"], out, out)
    return updated


def _add(out: str, index, new: list[str], build: str, meta: dict):
    """(index, its new float16 vectors file or None, the id columns added) after adding `new`'s vectors.

    An index re-ranked from float16 vectors gets a new file: the old rows copied, the new ones appended (the
    served file is never written to, so it keeps serving until the new build is published)."""
    base, mapped = detach(index)
    if mapped is None:
        return index, None, add_all(index, new)
    vectors = vectors_workfile(out, build)
    with removed_on_error(vectors):
        writer = Float16Writer(vectors, base.d, base.ntotal + sum(num_rows(u) for u in new))
        writer.copy_from(mapped)
        added = add_all(base, new, vectors=writer)
        index = attach(base, open_vectors(vectors))
    apply_tuning(index, meta.get("tuning") or {})
    return index, vectors, added


def _add_parts(out: str, index, ids: pa.Table, meta: dict, new: list[str], files: list[str], drift: dict,
               start: float, runner: Runner, part_rows: int, probe: tuple) -> dict:
    """Add `new` to an index built in parts: parts of the new files added to copies of its trained empty index,
    merged after its own lists into a fresh copy (a new `.ivfdata` when on disk), published (index/parts.py)."""
    build = fingerprint(files)
    base, mapped = detach(index)
    work = work_folder(out, build)
    with cleaned_up(work):
        trained = os.path.join(work, "trained.faiss")
        shutil.copyfile(local_path(join(out, INDEX_DIR, meta["files"]["trained"])), trained)
        vectors = os.path.join(work, "vectors.faiss") if mapped is not None else None
        parts = split(new, part_rows, first=int(base.ntotal))
        if vectors:
            create(vectors, base.d, parts[-1].first + parts[-1].rows)
            copy_rows(mapped, vectors)
        no_queries = np.zeros((0, base.d), np.float32)
        job = PartsJob(work, base.d, trained, vectors, parts, no_queries, np.zeros(0, np.int64), 1)
        runner(job, [p.number for p in parts])
        folder = local_path(join(out, INDEX_DIR))
        merged, lists = merge(job, faiss.read_index(trained), [p.number for p in parts], folder, build, before=base)
        merged = attach(merged, open_vectors(vectors)) if vectors else merged
        apply_tuning(merged, meta.get("tuning") or {})
        updated = _updated_meta(meta, files, merged, drift, len(new), time.perf_counter() - start, lists, parts=True)
        updated["tuning"] = _speed_after_add(merged, meta, *probe)
        added = [pq.read_table(job.ids_path(p.number)) for p in parts]
        ready = {"trained": trained, **({"vectors": vectors} if vectors else {})}
        save(out, merged, pa.concat_tables([ids, *added]), updated, ready)
    return updated


def _speed_after_add(index, meta: dict, probe, probe_ids) -> dict:
    """The build's tuning with queries/s and latency measured again at the index's new size (held-out new
    vectors as queries, as many as the build used); its recall stays the build's, marked with its size."""
    tuning = dict(meta.get("tuning") or {})
    queries = int(tuning.get("queries") or len(probe))
    k = int(tuning.get("k") or 10)
    if len(probe):
        _, speed = timed_search(index, probe[:queries], probe_ids[:queries], min(k, max(1, int(index.ntotal) - 1)))
        tuning.update(speed, speed_queries=min(queries, len(probe)))
    tuning["speed_count"] = int(index.ntotal) if len(probe) else tuning.get("speed_count", int(meta["count"]))
    tuning["recall_count"] = tuning.get("recall_count", int(meta["count"]))
    return tuning


def _drift(index, meta: dict, probe, tolerance: float) -> dict:
    """Quantization error of a sample of the new vectors, relative to the build-time error."""
    error = quantization_error(index, probe)
    baseline = _total(meta.get("quantization_error") or {})
    ratio = _total(error) / baseline if baseline > 0 else 1.0
    return {"error": error, "baseline": meta.get("quantization_error"), "ratio": round(ratio, 4),
            "tolerance": tolerance, "drifted": ratio > tolerance, "rebuild_recommended": ratio > tolerance}


def _updated_meta(meta: dict, files: list[str], index, drift: dict, added_files: int, seconds: float,
                  lists: str | None = None, parts: bool = False) -> dict:
    build = fingerprint(files)
    added = int(index.ntotal) - int(meta["count"])
    history = [*meta.get("updates", []), {
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "shards": added_files,
        "vectors": added, "seconds": round(seconds, 3), "drift_ratio": drift["ratio"],
    }]
    return {
        **meta, "count": int(index.ntotal), "fingerprint": build, "shards": len(files),
        "inputs": [signature(u) for u in files], "drift": drift, "updates": history,
        "files": file_names(build, "vectors" in meta["files"], lists, parts),
        "update": {"mode": "added", "added": added, "shards": added_files},
    }
