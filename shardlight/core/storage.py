"""Where bytes live: shard listing, fsspec access and atomic writes, for local paths and object stores."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import fsspec
from braceexpand import braceexpand

from shardlight.core.errors import InputError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def local_path(url: str) -> str:
    return str(url)[len("file://"):] if str(url).startswith("file://") else str(url)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    if not is_local(url):
        fs.invalidate_cache()  # other processes (Ray workers, other runs) write here: never trust a listing cache
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path segments for local paths and URLs alike."""
    if is_local(base):
        return str(Path(local_path(base)).joinpath(*parts))
    return "/".join([str(base).rstrip("/"), *parts])


def shard_name(url: str) -> str:
    """Output stem of a shard: `data/00012.tar.gz` -> `00012`."""
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_shard(path: str) -> bool:
    return path.endswith(SHARD_SUFFIXES)


def list_shards(patterns: str | list[str]) -> list[str]:
    """Expand brace patterns, globs and directories into a sorted, de-duplicated list of shard URLs."""
    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand(str(pattern)):
            found.extend(_expand_one(expanded))
    shards = sorted(dict.fromkeys(found))
    if not shards:
        raise InputError(f"no input shards match {', '.join(map(str, patterns))!r}")
    names = [shard_name(s) for s in shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"two input shards share the output name {dupes[0]!r}; rename one of them")
    return shards


def _expand_one(pattern: str) -> list[str]:
    fs, path = filesystem(pattern)
    protocol = None if is_local(pattern) else str(pattern).split("://", 1)[0]

    def url(p: str) -> str:
        return p if protocol is None else f"{protocol}://{p}"

    if re.search(r"[*?\[]", path):
        return [url(p) for p in fs.glob(path) if _is_shard(p)]
    if fs.isdir(path):
        return [url(p) for p in sorted(fs.find(path)) if _is_shard(p)]
    if fs.exists(path):
        return [url(path)]
    raise InputError(f"input not found: {pattern}")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def check_output(url: str) -> None:
    """An output must be a folder (or not exist yet): a file there is a one-line InputError."""
    if is_local(url) and Path(local_path(url)).exists() and not Path(local_path(url)).is_dir():
        raise InputError(f"output {url} is a file, not a folder: give --out a folder path (it is created if missing)")


def makedirs(url: str) -> None:
    check_output(url)
    if is_local(url):
        Path(local_path(url)).mkdir(parents=True, exist_ok=True)


def write_atomic(url: str, data: bytes) -> None:
    """Write bytes so that readers see either nothing or the whole file.

    Local: temp file in the same folder, fsync, rename. Object stores: a single PUT is already atomic.
    """
    if is_local(url):
        path = Path(local_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs, path = filesystem(url)
        fs.pipe_file(path, data)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_ranges(url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes at each (offset, size) of one file, opened once: tar members by their recorded offsets."""
    with open_read(url) as f:
        found = []
        for offset, size in ranges:
            f.seek(offset)
            found.append(f.read(size))
    return found


def open_read(url: str):
    fs, path = filesystem(url)
    return fs.open(path, "rb")
