"""Add new shards' embeddings to an existing index without retraining it.

    >>> from index.update import update_index
    >>> update_index("out")                          # adds OUT/embeddings files the index has not seen
    >>> update_index("out", rebuild_on_drift=True)   # retrains when the new data fits the quantizer badly

New vectors are encoded with the index's trained quantizer and appended, and the id map is extended,
so the result answers exactly as a rebuild that kept the same quantizer (and, for Flat, exactly as any
rebuild). A shard whose embeddings were rewritten or removed forces a full rebuild. Drift is the ratio
of the new vectors' quantization error to the error measured on held-out vectors at build time.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import pyarrow as pa

from index.build import add_all, build_index, quantization_error, removed_on_error
from index.rerank import Float16Writer, attach, detach, open_vectors
from index.store import file_names, includes_synthetic, load_index, read_meta, save, vectors_workfile
from index.tune import apply_tuning
from index.vectors import file_name, fingerprint, index_files, num_rows, sample, signature

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
    drift = _drift(index, meta, new, drift_tolerance)
    if drift["drifted"] and rebuild_on_drift:
        return _rebuild(out, meta, f"data drifted (quantization error ×{drift['ratio']:.2f})", **build_kwargs)
    index, vectors, added = _add(out, index, new, fingerprint(files), meta)
    updated = _updated_meta(meta, files, index, drift, len(new), time.perf_counter() - start)
    save(out, index, pa.concat_tables([ids, added]), updated, vectors)
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


def _drift(index, meta: dict, new: list[str], tolerance: float) -> dict:
    """Quantization error of a sample of the new vectors, relative to the build-time error."""
    _, probe, _ = sample(new, 0, DRIFT_SAMPLE)
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
        "files": file_names(build, "vectors" in meta["files"]),
        "update": {"mode": "added", "added": added, "shards": added_files},
    }
