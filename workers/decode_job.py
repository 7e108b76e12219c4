"""What one decode worker does with a chunk of images: bytes → RGB → the models' pixels.

This module runs inside decode worker processes, so it imports neither torch nor webdataset (a spawned
worker then starts in a fraction of a second and stays small); the targets are set once per worker by
`init_worker`, and each call gets only the image bytes. Results keep the chunk's order; a bad image is an
error string in its place, never an exception that would lose the rest of the chunk. A decode process hands
its results over in a file and sends back only the file's path (`decode_chunk_to_file`): a reply that short
is one atomic pipe write, so a process killed while replying cannot leave half a message behind.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shardlight.core.errors import first_line
from shardlight.models.preprocess import PixelSpec, open_rgb, to_uint8


@dataclass(frozen=True)
class DecodeSpecs:
    """The pixels each model wants: a PixelSpec (uint8 out) or, when its transform has none, the transform."""

    clip: PixelSpec | Callable
    label: PixelSpec | Callable | None = None
    draft: bool = False  # reduced-scale JPEG decode for images at least twice the largest resize

    @property
    def draft_to(self) -> int | None:
        specs = [s for s in (self.clip, self.label) if s is not None]
        if not self.draft or not all(isinstance(s, PixelSpec) for s in specs):
            return None  # a transform we cannot read may crop at any scale: decode in full
        return max(s.resize for s in specs)


def pixels(image, target):
    return to_uint8(image, target) if isinstance(target, PixelSpec) else target(image)


def decode_one(specs: DecodeSpecs, data: bytes, fmt: str | None) -> tuple | str:
    """(width, height, clip pixels, label pixels | None), or the error message for a bad image."""
    try:
        image, width, height = open_rgb(data, specs.draft_to)
    except Exception as err:  # PIL raises many types for bad data (OSError, SyntaxError, bomb errors)
        return f"cannot decode {fmt}: {first_line(err)}"
    label = None if specs.label is None else pixels(image, specs.label)
    return width, height, pixels(image, specs.clip), label


_SPECS: DecodeSpecs | None = None
NICENESS = 5


def init_worker(specs: DecodeSpecs, folder: str | None = None) -> None:
    """Process-pool initializer: one worker decodes for one set of models, for its whole life; `folder` is
    where its results go (`decode_chunk_to_file`)."""
    global _SPECS
    _SPECS = specs
    # A decode worker yields to the model threads it shares the cores with; it only needs to keep ahead.
    os.nice(NICENESS)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(), folder), daemon=True).start()


def _exit_with_parent(parent: int, folder: str | None) -> None:
    """A killed actor (ray.kill, SIGKILL) cannot shut its pool down or remove its results folder; its decode
    workers must not outlive it, and the last thing they do is remove the folder."""
    while os.getppid() == parent:
        time.sleep(1.0)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def decode_chunk(items: list[tuple[bytes, str | None]], specs: DecodeSpecs | None = None) -> list:
    """Decode a chunk in order; `specs` is given by thread workers and set by `init_worker` in processes."""
    specs = specs or _SPECS
    return [decode_one(specs, data, fmt) for data, fmt in items]


def decode_chunk_to_file(items: list[tuple[bytes, str | None]], folder: str) -> list | str:
    """`decode_chunk` in a decode process: the results are written to a file in `folder` and its path is the
    reply. Python's ProcessPoolExecutor reads a reply with no timeout, so a process killed halfway through
    writing a reply larger than one atomic pipe write (PIPE_BUF, 4 KiB) hangs the pool's reader for good;
    a path is far below that. With no room for the file, the results go through the pipe as before."""
    results = decode_chunk(items)
    try:
        fd, path = tempfile.mkstemp(dir=folder, suffix=".chunk")
        with os.fdopen(fd, "wb") as out:
            pickle.dump(results, out, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError:
        return results
    return path


def read_chunk_file(reply: list | str) -> list:
    """The results behind a decode process's reply (the file is removed once read)."""
    if not isinstance(reply, str):
        return reply
    with open(reply, "rb") as spilled:
        results = pickle.load(spilled)  # written by this worker's own decode process, in its private folder
    os.unlink(reply)
    return results
