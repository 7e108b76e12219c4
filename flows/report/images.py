"""Thumbnails for the report, read back from the source shards (one seek per image when the offset is known).

Real rows point into their input shard (URL from the shard's stats) by `tar_offset`/`tar_size`; synthetic
rows into `OUT/augmented_images/<shard>.tar`. Compressed shards, or rows without an offset, are found by one
streaming scan of the tar per shard. A missing or unreadable image becomes None, never an error.
"""

from __future__ import annotations

import base64
import io
import logging
import tarfile
from collections import defaultdict

from PIL import Image

from flows.report.data import Sample
from shardlight.core.layout import augmented_path
from shardlight.core.schema import IMAGE_EXTS
from shardlight.core.storage import exists, open_read, read_ranges

log = logging.getLogger("shardlight")

THUMB_PX = 112  # longest side of a thumbnail in the page


def read_images(out: str, samples: list[Sample], source_urls: dict[str, str]) -> dict[str, bytes | None]:
    """Image bytes by key for `samples`; None where the image cannot be found."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        url = augmented_path(out, s.shard, "tar") if s.synthetic else source_urls.get(s.shard)
        groups[url or ""].append(s)
    found: dict[str, bytes | None] = {}
    for url, group in groups.items():
        found.update(_read_group(url, group))
    return found


def _read_group(url: str, samples: list[Sample]) -> dict[str, bytes | None]:
    result: dict[str, bytes | None] = {s.key: None for s in samples}
    if not url or not exists(url):
        if samples:
            log.warning("report: source shard %r not found; %d thumbnail(s) left blank", url, len(samples))
        return result
    try:
        seekable = [s for s in samples if s.tar_offset is not None and s.tar_size]
        for s, data in zip(seekable, read_ranges(url, [(s.tar_offset, s.tar_size) for s in seekable])):
            result[s.key] = data
        rest = {s.key for s in samples if result[s.key] is None}
        if rest:
            result.update(_scan_tar(url, rest))
    except (OSError, tarfile.TarError, EOFError) as err:
        log.warning("report: cannot read thumbnails from %s: %s", url, err)
    return result


def _scan_tar(url: str, keys: set[str]) -> dict[str, bytes]:
    """Stream a (possibly compressed) tar once and pick the image members of `keys`."""
    found = {}
    with open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            stem, _, ext = info.name.rpartition(".")
            key = stem.rsplit("/", 1)[-1]
            if info.isreg() and key in keys and ext.lower() in IMAGE_EXTS:
                found[key] = tar.extractfile(info).read()
                if len(found) == len(keys):
                    break
    return found


def thumbnail(data: bytes | None, size: int = THUMB_PX) -> Image.Image | None:
    """A small RGB copy of an encoded image, or None if it does not decode."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale
            thumb = img.convert("RGB")
    except Exception:  # PIL raises many types for bad data
        return None
    thumb.thumbnail((size, size))
    return thumb


def data_uri(data: bytes | None, size: int = THUMB_PX) -> str | None:
    """A thumbnail as an inline JPEG data URI, so the page needs no image files per sample."""
    thumb = thumbnail(data, size)
    if thumb is None:
        return None
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
