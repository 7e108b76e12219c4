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
import time
from datetime import UTC, datetime

import pyarrow as pa

from index.build import build_index, quantization_error
from index.store import includes_synthetic, load_index, read_meta, save
from index.tune import timed_search
from index.vectors import file_name, fingerprint, index_files, iter_vectors, sample, signature

log = logging.getLogger("shardlight")

DRIFT_TOLERANCE = 1.25  # new data's quantization error over the build-time error that calls for a rebuild
DRIFT_SAMPLE = 2000  # new vectors used to measure drift


def _total(error: dict) -> float:
    return float(error.get("coarse", 0.0)) + float(error.get("codec", 0.0))


def _rebuild(out: str, meta: dict | None, reason: str, **build_kwargs) -> dict:
    log.info("rebuilding the index: %s", reason)
    kwargs = {"factory": (meta or {}).get("requested_factory", (meta or {}).get("factory", "Flat")),
              "model": (meta or {}).get("model") or None, **build_kwargs}
    return {**build_index(out, **kwargs), "update": {"mode": "rebuilt", "reason": reason}}


def update_index(out: str, *, rebuild_on_drift: bool = False, drift_tolerance: float = DRIFT_TOLERANCE,
                 synthetic: bool | None = None, **build_kwargs) -> dict:
    """Bring OUT/index up to date with OUT/embeddings, adding new shards incrementally.

    Args:
        out: the run's output folder or URL.
        rebuild_on_drift: rebuild (retrain) instead of adding when the new data has drifted.
        drift_tolerance: quantization-error ratio above which the data counts as drifted.
        synthetic: index the generated rows too (True) or not (False); None keeps the index's choice.
            Changing it rebuilds.
        **build_kwargs: passed to `build_index` when a rebuild is needed.

    Returns the index metadata; its `update` entry says what was done and `drift` what was measured.
    """
    meta = read_meta(out, missing_ok=True)
    was = includes_synthetic(meta) if meta else True
    synthetic = was if synthetic is None else synthetic
    build_kwargs["synthetic"] = synthetic
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
    tables, before = [ids], int(index.ntotal)
    for vectors, id_table in iter_vectors(new):
        index.add(vectors)
        tables.append(id_table)
    tuning = _speed_after_add(index, meta, probe, probe_rows + before)
    updated = _updated_meta(meta, files, index, drift, len(new), time.perf_counter() - start)
    updated["tuning"] = tuning
    save(out, index, pa.concat_tables(tables), updated)
    if drift["drifted"]:
        log.warning("new data fits the index's quantizer %.2f× worse than at build time: consider a rebuild "
                    "(`shardlight index-update %s --rebuild-on-drift` or `shardlight index %s`)",
                    drift["ratio"], out, out)
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


def _updated_meta(meta: dict, files: list[str], index, drift: dict, added_files: int, seconds: float) -> dict:
    build = fingerprint(files)
    added = int(index.ntotal) - int(meta["count"])
    history = [*meta.get("updates", []), {
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "shards": added_files,
        "vectors": added, "seconds": round(seconds, 3), "drift_ratio": drift["ratio"],
    }]
    return {
        **meta, "count": int(index.ntotal), "fingerprint": build, "shards": len(files),
        "inputs": [signature(u) for u in files], "drift": drift, "updates": history,
        "files": {"index": f"image.{build}.faiss", "ids": f"ids.{build}.parquet"},
        "update": {"mode": "added", "added": added, "shards": added_files},
    }
