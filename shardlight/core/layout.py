"""The output layout: where each kind of output lives under OUT, and whether a shard's work is done.

```
OUT/embeddings/<shard>.parquet   input rows (written last: the shard's "embedded" marker)
OUT/errors/<shard>.parquet       skipped samples and shard notes
OUT/augmented/<shard>.parquet    generated rows (written last: the shard's "augmented" marker)
OUT/augmented_images/<shard>.tar their images (WebDataset); older outputs keep them in augmented/
OUT/index/                       the FAISS index (index.store)
OUT/run.json                     resolved config, models, versions and stats of the last run
```

Every file is written atomically, so "done" is simply "the marker file exists". Shard stats travel in
the key-value metadata of the shard's Parquet file, so a finished shard describes itself. A write killed
before its rename leaves a `.NAME.<hex>.tmp` file, never a wrong NAME; a run removes those at its start
(`remove_temporary`, under the output lease, so no live writer owns them).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from shardlight.core.storage import exists, filesystem, join, open_read, shard_name

STATS_KEY = b"shardlight.stats"
TEMP_GLOB = ".*.tmp"  # storage.write_atomic's and index.store's temporary files, index/parts.py's work folders
OUT_FOLDERS = ("", "embeddings", "errors", "augmented", "index")  # where OUT's atomically written files live
ROW_SOURCES = ("embeddings", "augmented")  # OUT/<source>/<shard>.parquet folders of rows, in index id order


def embeddings_path(out: str, shard: str) -> str:
    return join(out, "embeddings", f"{shard}.parquet")


def errors_path(out: str, shard: str) -> str:
    return join(out, "errors", f"{shard}.parquet")


def augmented_path(out: str, shard: str, ext: str) -> str:
    """OUT/augmented/<shard>.parquet (generated rows) or OUT/augmented_images/<shard>.tar (their images).

    The tars live outside the Parquet folder so that `pd.read_parquet(OUT/augmented)` and other dataset readers
    see Parquet only. Outputs written before the move keep their tars in OUT/augmented/: when only that one
    exists, it is the path returned (for reading, and for the writer, so one output never has both).
    """
    if ext != "tar":
        return join(out, "augmented", f"{shard}.{ext}")
    new, old = join(out, "augmented_images", f"{shard}.tar"), join(out, "augmented", f"{shard}.tar")
    return old if not exists(new) and exists(old) else new


def run_record_path(out: str) -> str:
    """OUT/run.json: resolved config, model names and versions, code version and stats of the last run."""
    return join(out, "run.json")


def shard_done(out: str, shard_url: str) -> bool:
    """The shard's embeddings file exists (it is written last, atomically)."""
    return exists(embeddings_path(out, shard_name(shard_url)))


def augment_done(out: str, shard_url: str) -> bool:
    """The shard's generated rows exist (written after its images, atomically)."""
    return exists(augmented_path(out, shard_name(shard_url), "parquet"))


def parquet_files(out: str, folder: str) -> list[str]:
    """OUT/<folder>/*.parquet, sorted by name, as URLs of OUT's kind; temporary `.NAME.tmp` files are not listed."""
    fs, path = filesystem(join(out, folder))
    if not fs.exists(path):
        return []
    names = (p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/*.parquet"))
    return sorted(join(out, folder, name) for name in names if not name.startswith("."))


def read_stats(url: str) -> dict:
    """The stats a finished shard recorded in its Parquet metadata."""
    with open_read(url) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return json.loads(meta.get(STATS_KEY, b"{}"))


def num_rows(url: str) -> int:
    """Rows in a Parquet file, read from its footer."""
    with open_read(url) as f:
        return pq.ParquetFile(f).metadata.num_rows


def stages_todo(out: str, shards: list[str], augment: bool) -> list[str]:
    """Shards with a stage still to run: not embedded, or (with augmentation on) not augmented."""
    return [s for s in shards if not shard_done(out, s) or (augment and not augment_done(out, s))]


def remove_temporary(out: str) -> list[str]:
    """Delete the `.NAME.*.tmp` files that killed writes left under OUT; returns their paths.

    Only safe while holding OUT's lease: a live run's temporary files look the same.
    """
    fs, root = filesystem(out)
    patterns = ["/".join(part for part in (root.rstrip("/"), folder, TEMP_GLOB) if part) for folder in OUT_FOLDERS]
    stale = [p for pattern in patterns for p in fs.glob(pattern)]
    for path in stale:
        fs.rm(path, recursive=True)  # index/parts.py's work folders are `.parts.….tmp` folders
    return stale
