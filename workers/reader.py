"""Reading WebDataset shards: tar members → samples (webdataset's grouping) → decoded images.

Every problem becomes a record instead of an exception: a sample that cannot be used yields a
`SampleError`, and a shard that is empty or truncated sets `ShardReader.problem` while every sample
read before the damage is still yielded. A sample whose member header survived a truncation but whose
data did not is yielded as a `SampleError` naming it, so every key a tar listing shows is accounted
for. Nothing is dropped without a record.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from shardlight.core.errors import first_line
from shardlight.core.schema import IMAGE_EXTS, SampleError
from shardlight.core.storage import open_read, shard_name


@dataclass
class RawSample:
    key: str
    shard: str
    image: bytes | None
    image_format: str | None
    caption: str | None
    meta: dict
    tar_offset: int | None  # byte offset of the image member's data in an uncompressed tar
    tar_size: int | None
    metadata_error: str | None = None  # the json member was unreadable; the row is kept without it


@dataclass
class DecodedSample:
    raw: RawSample
    image: Image.Image
    width: int
    height: int


@dataclass
class ShardReader:
    """Iterate the samples of one shard, recording damage instead of raising."""

    url: str
    problem: str | None = None  # shard-level damage (empty, truncated, unreadable)
    members: int = 0
    cut_off: str | None = None  # the member whose header was read but whose data the truncation cut
    _offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return shard_name(self.url)

    def _members(self) -> Iterator[dict]:
        try:
            with open_read(self.url) as stream:
                seekable = not self.url.endswith((".gz", ".tgz"))
                tar = tarfile.open(fileobj=stream, mode="r|*")
                for info in tar:
                    if not info.isreg():
                        continue
                    self.cut_off = info.name  # until its data has been read in full
                    data = tar.extractfile(info).read()
                    self.cut_off = None
                    self.members += 1
                    if seekable:
                        self._offsets[info.name] = (info.offset_data, info.size)
                    yield {"fname": info.name, "data": data, "__url__": self.url}
                    tar.members = []  # streaming: keep memory flat on large shards
                # tarfile ends quietly when a stream stops on a header boundary; a complete archive
                # ends with a zero block, which the stream has then consumed.
                if self.members and tar.fileobj.pos - tar.offset < tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("no end-of-archive marker")
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            if self.members == 0 and any(w in str(err).lower() for w in ("empty", "end of file header")):
                self.problem = "empty shard (no tar members)"
            elif self.members == 0:
                self.problem = f"unreadable shard: {first_line(err)}"
            else:
                self.problem = f"truncated shard after {self.members} members: {first_line(err)}"

    def __iter__(self) -> Iterator[RawSample | SampleError]:
        last_key = None
        for sample in group_by_keys(self._members()):
            last_key = sample["__key__"]
            yield self._to_raw(sample)
        cut_key = (base_plus_ext(self.cut_off) or (None,))[0] if self.cut_off else None
        if cut_key and cut_key != last_key:  # members of it already read were yielded with that sample
            yield SampleError(cut_key.rsplit("/", 1)[-1], self.name, "read",
                              f"cut off by the truncation: member {self.cut_off} is incomplete")

    def _to_raw(self, sample: dict) -> RawSample | SampleError:
        key = sample["__key__"].rsplit("/", 1)[-1]
        meta: dict = {}
        metadata_error = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                if not isinstance(meta, dict):
                    raise ValueError("json metadata is not an object")
            except ValueError as err:
                meta, metadata_error = {}, f"bad json metadata: {first_line(err)}"
        caption = sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else None
        if not caption:
            caption = meta.get("caption") if isinstance(meta.get("caption"), str) and meta.get("caption") else None
        fmt = next((ext for ext in IMAGE_EXTS if ext in sample), None)
        if fmt is None:
            found = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
            return SampleError(key, self.name, "read", f"no image member (found: {found})")
        offset, size = self._offsets.pop(f"{sample['__key__']}.{fmt}", (None, None))
        return RawSample(key=key, shard=self.name, image=sample[fmt], image_format=fmt, caption=caption,
                         meta=meta, tar_offset=offset, tar_size=size,
                         metadata_error=metadata_error)


def decode(raw: RawSample) -> DecodedSample | SampleError:
    """Decode image bytes to RGB; a corrupt or unreadable image becomes a SampleError."""
    try:
        with Image.open(io.BytesIO(raw.image)) as img:
            img.load()
            width, height = img.size
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises many types for bad data (OSError, SyntaxError, bomb errors)
        return SampleError(raw.key, raw.shard, "decode", f"cannot decode {raw.image_format}: {first_line(err)}")
    return DecodedSample(raw=raw, image=rgb, width=width, height=height)
