"""What one decode worker does with a chunk of images: bytes → RGB → the models' pixels.

This module runs inside decode worker processes, so it imports neither torch nor webdataset (a spawned
worker then starts in a fraction of a second and stays small); the targets are set once per worker by
`init_worker`, and each call gets only the image bytes. Results keep the chunk's order; a bad image is an
error string in its place, never an exception that would lose the rest of the chunk.
"""

from __future__ import annotations

import os
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


def init_worker(specs: DecodeSpecs) -> None:
    """Process-pool initializer: one worker decodes for one set of models, for its whole life."""
    global _SPECS
    _SPECS = specs
    # A decode worker yields to the model threads it shares the cores with; it only needs to keep ahead.
    os.nice(NICENESS)


def decode_chunk(items: list[tuple[bytes, str | None]], specs: DecodeSpecs | None = None) -> list:
    """Decode a chunk in order; `specs` is given by thread workers and set by `init_worker` in processes."""
    specs = specs or _SPECS
    return [decode_one(specs, data, fmt) for data, fmt in items]
