"""The Parquet rows of shardlight's outputs: one typed `Row` per image, one `SampleError` per problem.

Input rows (OUT/embeddings/) and generated rows (OUT/augmented/) are both `Row`s and go through
`rows_table`, so both folders have ONE schema and one glob reads them together: the core columns
(`CORE_COLUMNS`, fixed types), the generation columns (`synthetic` is False on input rows, the others
null), then the input's json fields as extra columns; a generated shard carries its source shard's extra
columns, null (`rows_table(..., like=)`).
Errors are data: every sample read is either a row or a `SampleError` with `dropped=True`
(`rows + dropped == samples read`); `dropped=False` records a detail of a row that was kept.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardlight.core.storage import write_atomic

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image members a WebDataset sample may carry

# How a DiT-generated row was made: typed columns on every row, null (synthetic: False) on input rows.
GENERATED_TYPES = {
    "synthetic": pa.bool_(), "mode": pa.string(), "source_key": pa.string(), "target_label": pa.string(),
    "seed": pa.int64(), "steps": pa.int32(), "guidance": pa.float32(), "strength": pa.float32(),
    "generator": pa.string(),
}
# Core columns; json fields of the same name are stored as json_<name>.
CORE_COLUMNS = (
    "key", "shard", "caption", "url", "width", "height", "image_format", "tar_offset", "tar_size",
    "image_embedding", "text_embedding", "clip_score",
    "label_id", "label", "label_prob", "topk_ids", "topk_probs", *GENERATED_TYPES,
)
# Consumed from json into core columns rather than copied as extras.
CONSUMED_JSON = ("key", "caption", "url")

ERROR_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("dropped", pa.bool_()),
])


@dataclass
class SampleError:
    key: str | None
    shard: str
    stage: str  # read | metadata | decode | compute | shard
    reason: str
    dropped: bool = True  # False: the row was kept and only this detail is recorded


@dataclass
class Generation:
    """How a generated image was made (workers/augment.py); its fields are the generation columns."""

    mode: str  # generate | vary
    target_label: str  # the class the DiT was conditioned on
    seed: int
    steps: int
    guidance: float
    generator: str  # the DiT, as loaded
    source_key: str | None = None  # vary: the input row it varies
    strength: float | None = None  # vary: the SDEdit noise level


@dataclass
class Row:
    """One image's row: where it came from, its CLIP vectors and score, its labels and its json fields."""

    key: str
    shard: str
    caption: str | None
    url: str | None
    width: int
    height: int
    image_format: str | None
    image_embedding: np.ndarray  # (dim,) float32, L2-normalised
    text_embedding: np.ndarray | None  # None: no caption (stored as null)
    clip_score: float | None
    tar_offset: int | None = None  # byte offset of the image member's data in its (uncompressed) tar
    tar_size: int | None = None
    label_id: int | None = None
    label: str | None = None
    label_prob: float | None = None
    topk_ids: list[int] | None = None
    topk_probs: list[float] | None = None
    meta: dict = field(default_factory=dict)  # the sample's json fields (extra columns)
    generation: Generation | None = None  # None: an input row


def _vectors(rows: np.ndarray, dim: int, mask: np.ndarray | None = None) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    if mask is None:
        return pa.FixedSizeListArray.from_arrays(flat, dim)
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


def extra_schema(schema: pa.Schema) -> pa.Schema:
    """The json-field columns of a rows table's schema (everything but the core columns)."""
    return pa.schema([f for f in schema if f.name not in CORE_COLUMNS])


def _generation_columns(rows: list[Row]) -> dict[str, pa.Array]:
    made = [r.generation for r in rows]
    columns = {"synthetic": pa.array([g is not None for g in made], pa.bool_())}
    for name, kind in GENERATED_TYPES.items():
        if name != "synthetic":
            columns[name] = pa.array([getattr(g, name) if g else None for g in made], kind)
    return columns


def _with_extras(arrays: dict, extras: dict[str, pa.Array], like: pa.Schema | None, n: int) -> dict:
    """`like`'s extra columns first, in its order and types (null where these rows lack them), then any others."""
    for f in like or []:
        arrays[f.name] = extras.pop(f.name).cast(f.type) if f.name in extras else pa.nulls(n, f.type)
    arrays.update(extras)
    return arrays


def rows_table(rows: list[Row], dim: int, like: pa.Schema | None = None) -> pa.Table:
    """The per-shard table of `rows`, in their order.

    `like`: another rows table's schema whose extra (json-field) columns this one must carry too, e.g. the
    source shard's for its generated rows, so that both read as one table.
    """
    zero = np.zeros(dim, np.float32)
    image = np.stack([r.image_embedding for r in rows]) if rows else np.zeros((0, dim), np.float32)
    text = np.stack([zero if r.text_embedding is None else r.text_embedding for r in rows]) if rows \
        else np.zeros((0, dim), np.float32)
    has_text = np.array([r.text_embedding is not None for r in rows], dtype=bool)

    def column(name: str, kind: pa.DataType) -> pa.Array:
        return pa.array([getattr(r, name) for r in rows], kind)

    arrays = {
        "key": column("key", pa.string()),
        "shard": column("shard", pa.string()),
        "caption": column("caption", pa.string()),
        "url": column("url", pa.string()),
        "width": column("width", pa.int32()),
        "height": column("height", pa.int32()),
        "image_format": column("image_format", pa.string()),
        "tar_offset": column("tar_offset", pa.int64()),
        "tar_size": column("tar_size", pa.int64()),
        "image_embedding": _vectors(image, dim),
        "text_embedding": _vectors(text, dim, mask=~has_text),
        "clip_score": column("clip_score", pa.float32()),
        "label_id": column("label_id", pa.int32()),
        "label": column("label", pa.string()),
        "label_prob": column("label_prob", pa.float32()),
        "topk_ids": column("topk_ids", pa.list_(pa.int32())),
        "topk_probs": column("topk_probs", pa.list_(pa.float32())),
        **_generation_columns(rows),
    }
    like = extra_schema(like) if like is not None else None
    return pa.table(_with_extras(arrays, extra_fields([r.meta for r in rows]), like, len(rows)))


def errors_table(errors: list[SampleError]) -> pa.Table:
    return pa.Table.from_pylist([asdict(e) for e in errors], schema=ERROR_SCHEMA)


def parquet_bytes(table: pa.Table, metadata: dict | None = None) -> bytes:
    """A Parquet file's bytes, with optional key-value metadata (the shard's stats)."""
    if metadata:
        existing = table.schema.metadata or {}
        table = table.replace_schema_metadata({**existing, **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_table(url: str, table: pa.Table, metadata: dict | None = None) -> None:
    """Write a Parquet file atomically, with optional key-value metadata (the shard's stats)."""
    write_atomic(url, parquet_bytes(table, metadata))
