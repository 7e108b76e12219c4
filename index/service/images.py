"""Image bytes of an indexed row, read from its tar with one seek.

The embedding stage records each image member's data offset and size inside the (uncompressed) tar.
Input rows point into their source shard (its URL is in the shard's stats); generated rows into
OUT/augmented_images/<shard>.tar. A request names a key, never a path: the key is looked up in the index's
id map, and only a tar recorded at embedding time is ever opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pyarrow.parquet as pq

from index.search import Searcher
from shardlight.core.errors import InputError
from shardlight.core.layout import augmented_path, read_stats
from shardlight.core.storage import open_read, read_ranges

MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
MAX_IMAGE_BYTES = 64 << 20  # a recorded size above this is treated as corrupt metadata


class ImageUnavailable(InputError):
    """The row exists but its image bytes cannot be served (compressed shard, moved source)."""


@dataclass
class ImageRef:
    url: str  # source shard
    offset: int
    size: int
    media_type: str


class ImageStore:
    """Resolves keys to (shard url, offset, size) and reads the bytes."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self._locations = lru_cache(maxsize=256)(self._read_locations)
        self._tar_url = lru_cache(maxsize=4096)(self._read_tar_url)

    def _read_locations(self, part: int) -> tuple[list, list, list]:
        with open_read(self.searcher.part_url(part)) as f:
            table = pq.read_table(f, columns=["tar_offset", "tar_size", "image_format"])
        return tuple(table.column(c).to_pylist() for c in ("tar_offset", "tar_size", "image_format"))

    def _read_tar_url(self, part: int) -> str | None:
        """Input rows: the source shard recorded in the shard's stats; generated rows: OUT/augmented_images/<shard>.tar."""
        source, shard = self.searcher.parts[part].split("/", 1)
        if source == "augmented":
            return augmented_path(self.searcher.out, shard, "tar")
        return read_stats(self.searcher.part_url(part)).get("url")

    def locate(self, key: str) -> ImageRef:
        i = self.searcher.id_of_key(key)
        part, row = int(self.searcher.part_of[i]), int(self.searcher.rows[i])
        offsets, sizes, formats = self._locations(part)
        url = self._tar_url(part)
        if offsets[row] is None or sizes[row] is None or url is None:
            raise ImageUnavailable(f"no stored image location for {key!r} (compressed source shard?)")
        if not 0 <= sizes[row] <= MAX_IMAGE_BYTES:
            raise ImageUnavailable(f"bad stored image size for {key!r}")
        media = MEDIA_TYPES.get((formats[row] or "").lower(), "application/octet-stream")
        return ImageRef(url=url, offset=int(offsets[row]), size=int(sizes[row]), media_type=media)

    def read(self, key: str) -> tuple[bytes, str]:
        """(bytes, media type) of the image stored for `key`."""
        ref = self.locate(key)
        try:
            (data,) = read_ranges(ref.url, [(ref.offset, ref.size)])
        except (OSError, ValueError) as err:
            raise ImageUnavailable(f"source shard of {key!r} cannot be read: {type(err).__name__}") from None
        if len(data) != ref.size:
            raise ImageUnavailable(f"source shard of {key!r} is shorter than recorded (changed since embedding?)")
        return data, ref.media_type
