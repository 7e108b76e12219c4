"""One output, one embedding space: the models and label settings that made OUT's rows, and the check that a
run uses the same ones.

A run writes `OUT/models.json` before it embeds its first shard: the CLIP and label specs (loadable, for the
searcher) and their *identity* — the settings that change a row's vectors or labels, with each local weights
or class-names file named by its content hash, so moving a checkout does not count as a change but retraining
does. A later run into the same OUT whose identity differs is refused in one line naming what differs: mixed
rows would give queries scores across two spaces (and labels of two kinds). Outputs written before
models.json existed are judged by what they recorded: run.json's config, else the index's meta.json model.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from shardlight.core.config import ClipSpec, LabelSpec
from shardlight.core.errors import InputError
from shardlight.core.layout import parquet_files, run_record_path
from shardlight.core.storage import exists, is_local, join, read_bytes, write_atomic

MODELS_FILE = "models.json"


def models_path(out: str) -> str:
    """OUT/models.json: the CLIP and label settings every row of OUT was made with."""
    return join(out, MODELS_FILE)


@lru_cache(maxsize=32)
def _file_hash(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _weights_id(value) -> object:
    """A local file by name and content hash (so a moved checkout matches); a tag, URL or flag as it is."""
    if isinstance(value, str) and is_local(value) and Path(value).is_file():
        st = Path(value).stat()
        return f"{Path(value).name} sha256:{_file_hash(str(Path(value).resolve()), st.st_size, st.st_mtime)}"
    return value


def identity(clip: dict, labels: dict) -> dict:
    """The settings that change what a row holds: its vectors (CLIP) and its labels."""
    ident = {"clip.model": clip.get("model"), "clip.pretrained": _weights_id(clip.get("pretrained"))}
    if clip.get("pretrained") is None:  # an untrained model: the seed is its weights
        ident["clip.seed"] = clip.get("seed", 0)
    kind = labels.get("kind", "vit")
    ident["labels.kind"] = kind
    if kind == "none":
        return ident
    ident["labels.top_k"] = labels.get("top_k", 5)
    names = labels.get("class_names")
    ident["labels.class_names"] = _weights_id(names) if isinstance(names, str) else names
    if kind == "vit":
        ident.update({"labels.model": labels.get("model"), "labels.pretrained": labels.get("pretrained", False),
                      "labels.checkpoint": _weights_id(labels.get("checkpoint"))})
    else:
        ident["labels.prompt"] = labels.get("prompt")
    return ident


def space_record(clip: ClipSpec, labels: LabelSpec) -> dict:
    """What OUT/models.json holds for a run with these specs."""
    clip_d, labels_d = clip.model_dump(), labels.model_dump()
    return {"clip": clip_d, "labels": labels_d, "identity": identity(clip_d, labels_d)}


def _read_json(url: str) -> dict | None:
    try:
        return json.loads(read_bytes(url)) if exists(url) else None
    except (OSError, ValueError):
        return None


def recorded_space(out: str) -> tuple[dict, str] | None:
    """(identity, where it was read) of OUT's existing rows; None when OUT holds no rows yet."""
    if not parquet_files(out, "embeddings"):
        return None
    record = _read_json(models_path(out))
    if record and record.get("identity"):
        return record["identity"], MODELS_FILE
    config = (_read_json(run_record_path(out)) or {}).get("config") or {}
    if config.get("clip"):
        return identity(config["clip"], config.get("labels") or {}), "run.json"
    model = (_read_json(join(out, "index", "meta.json")) or {}).get("model") or {}
    if model:  # only the CLIP half is known: compare that
        return {k: v for k, v in identity(model, {"kind": "none"}).items() if k.startswith("clip.")}, "index/meta.json"
    return None


def recorded_clip(out: str) -> dict | None:
    """The CLIP spec OUT's rows were embedded with (models.json, else run.json), or None."""
    for url, pick in ((models_path(out), lambda d: d.get("clip")),
                      (run_record_path(out), lambda d: (d.get("config") or {}).get("clip"))):
        record = _read_json(url)
        if record and pick(record):
            return pick(record)
    return None


def _show(value) -> str:
    return "null" if value is None else str(value)


def check_space(out: str, clip: ClipSpec, labels: LabelSpec) -> None:
    """Refuse (one InputError line) a run whose models or label settings differ from those of OUT's rows."""
    found = recorded_space(out)
    if found is None:
        return
    recorded, where = found
    current = identity(clip.model_dump(), labels.model_dump())
    diffs = [f"{k} {_show(recorded.get(k))} → {_show(current.get(k))}" for k in sorted(set(recorded) | set(current))
             if k in recorded and recorded.get(k) != current.get(k)]
    if not diffs:
        return
    raise InputError(
        f"{out} holds rows made with other models or label settings ({'; '.join(diffs)}; from {where}): mixing "
        f"them would put two embedding spaces in one output. Write to a new output (--out NEW_DIR), or re-embed "
        f"this one by removing {join(out, 'embeddings')}, errors, augmented, index and {MODELS_FILE} first")


def record_space(out: str, clip: ClipSpec, labels: LabelSpec) -> None:
    """Write OUT/models.json unless OUT already has rows described by one (call after `check_space`)."""
    if parquet_files(out, "embeddings") and exists(models_path(out)):
        return
    write_atomic(models_path(out), json.dumps(space_record(clip, labels), indent=2).encode())
