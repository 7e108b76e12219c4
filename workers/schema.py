"""The Parquet layout of shardlight's outputs, and the atomic writer for it.

One embeddings file per input shard (rows in shard order) and one errors file per shard. Shard stats
travel in the embeddings file's key-value metadata, so a finished shard describes itself.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.storage import join, write_atomic

STATS_KEY = b"shardlight.stats"

# Core columns; json fields of the same name are stored as json_<name>.
CORE_COLUMNS = (
    "key", "shard", "caption", "url", "width", "height", "image_format", "tar_offset", "tar_size",
    "image_embedding", "text_embedding", "clip_score",
    "label_id", "label", "label_prob", "topk_ids", "topk_probs",
)
# Consumed from json into core columns rather than copied as extras.
CONSUMED_JSON = ("key", "caption", "url")

ERROR_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("dropped", pa.bool_()),
])


def embeddings_path(out: str, shard: str) -> str:
    return join(out, "embeddings", f"{shard}.parquet")


def errors_path(out: str, shard: str) -> str:
    return join(out, "errors", f"{shard}.parquet")


def augmented_path(out: str, shard: str, ext: str) -> str:
    """OUT/augmented/<shard>.tar (generated images) or .parquet (their rows)."""
    return join(out, "augmented", f"{shard}.{ext}")


def _vectors(rows: np.ndarray | list, dim: int, mask: np.ndarray | None = None) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    arr = pa.FixedSizeListArray.from_arrays(flat, dim)
    if mask is None:
        return arr
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(mask))


def _extra_column(values: list) -> pa.Array:
    """json fields: scalars keep their type; nested values or mixed types become JSON strings."""
    try:
        arr = pa.array(values)
        if not (pa.types.is_struct(arr.type) or pa.types.is_list(arr.type) or pa.types.is_null(arr.type)):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def extra_fields(metas: list[dict]) -> dict[str, pa.Array]:
    names = sorted({k for m in metas for k in m if k not in CONSUMED_JSON})
    columns = {}
    for name in names:
        column = f"json_{name}" if name in CORE_COLUMNS else name
        columns[column] = _extra_column([m.get(name) for m in metas])
    return columns


def embeddings_table(cols: dict, dim: int, top_k: int) -> pa.Table:
    """Build the per-shard table from column lists gathered by the worker."""
    n = len(cols["key"])
    has_text = np.array([c is not None for c in cols["caption"]], dtype=bool)
    text = np.asarray(cols["text_embedding"], np.float32).reshape(n, dim) if n else np.zeros((0, dim), np.float32)
    arrays = {
        "key": pa.array(cols["key"], pa.string()),
        "shard": pa.array(cols["shard"], pa.string()),
        "caption": pa.array(cols["caption"], pa.string()),
        "url": pa.array(cols["url"], pa.string()),
        "width": pa.array(cols["width"], pa.int32()),
        "height": pa.array(cols["height"], pa.int32()),
        "image_format": pa.array(cols["image_format"], pa.string()),
        "tar_offset": pa.array(cols["tar_offset"], pa.int64()),
        "tar_size": pa.array(cols["tar_size"], pa.int64()),
        "image_embedding": _vectors(np.asarray(cols["image_embedding"], np.float32).reshape(n, dim), dim),
        "text_embedding": _vectors(text, dim, mask=~has_text),
        "clip_score": pa.array(cols["clip_score"], pa.float32()),
        "label_id": pa.array(cols["label_id"], pa.int32()),
        "label": pa.array(cols["label"], pa.string()),
        "label_prob": pa.array(cols["label_prob"], pa.float32()),
        "topk_ids": pa.array(cols["topk_ids"], pa.list_(pa.int32())),
        "topk_probs": pa.array(cols["topk_probs"], pa.list_(pa.float32())),
    }
    arrays.update(extra_fields(cols["meta"]))
    return pa.table(arrays)


def write_table(url: str, table: pa.Table, metadata: dict | None = None) -> None:
    if metadata:
        existing = table.schema.metadata or {}
        table = table.replace_schema_metadata({**existing, **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(url, buf.getvalue())


def errors_table(errors: list) -> pa.Table:
    return pa.Table.from_pylist([asdict(e) for e in errors], schema=ERROR_SCHEMA)


def read_stats(url: str) -> dict:
    """The stats a finished shard recorded in its Parquet metadata."""
    from workers.storage import open_read

    with open_read(url) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return json.loads(meta.get(STATS_KEY, b"{}"))


def run_record_path(out: str) -> str:
    """OUT/run.json: resolved config, model names and versions, code version and stats of the last run."""
    return join(out, "run.json")
