"""A PNG contact sheet of a run's DiT augmentations: one row per class, generated samples across;
for `vary`, each source image followed by its variations.

Reads OUT/augmented/*.parquet (which rows exist, their target class and mode), the matching tars in OUT/augmented_images/ (the
PNGs) and, for `vary`, the source images from the input shard whose URL the augmented Parquet's stats record.
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from shardlight.core.layout import augmented_path, parquet_files, read_stats
from shardlight.core.schema import SampleError
from shardlight.core.storage import join, open_read, read_bytes
from workers.reader import ShardReader, decode

CELL, LABEL_W, GAP = 64, 150, 8


def _tar_images(url: str) -> dict[str, Image.Image]:
    with tarfile.open(fileobj=io.BytesIO(read_bytes(url))) as tar:
        return {m.name[:-4]: Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                for m in tar if m.name.endswith(".png")}


def _source_images(shard_url: str, keys: set[str]) -> dict[str, Image.Image]:
    found = {}
    for raw in ShardReader(shard_url):
        if not isinstance(raw, SampleError) and raw.key in keys:
            decoded = decode(raw)
            if not isinstance(decoded, SampleError):
                found[raw.key] = decoded.image
    return found


def collect(out: str, max_per_row: int = 8) -> tuple[dict[str, list], dict[str, list]]:
    """{class: [generated images]} and {class: [(source, [variations])]} from a run folder."""
    generated, varied = defaultdict(list), defaultdict(list)
    for parquet in parquet_files(out, "augmented"):
        rows = pq.read_table(open_read(parquet)).to_pylist()
        images = _tar_images(augmented_path(out, parquet.rsplit("/", 1)[-1].removesuffix(".parquet"), "tar"))
        vary_rows = [r for r in rows if r.get("mode") == "vary"]
        sources = _source_images(read_stats(parquet)["url"], {r["source_key"] for r in vary_rows}) if vary_rows else {}
        for r in rows:
            if r.get("mode") == "generate" and len(generated[r["target_label"]]) < max_per_row:
                generated[r["target_label"]].append(images[r["key"]])
        by_source = defaultdict(list)
        for r in vary_rows:
            by_source[(r["target_label"], r["source_key"])].append(images[r["key"]])
        for (label, key), variations in by_source.items():
            if key in sources:
                varied[label].append((sources[key], variations))
    return generated, varied


def _row_cells(generated: list, varied: list, max_per_row: int) -> list[tuple[Image.Image, str]]:
    """Cells of one class row: generated images, then each source (framed) with its variations."""
    cells = [(im, "gen") for im in generated]
    for source, variations in varied:
        cells.append((source, "source"))
        cells += [(im, "vary") for im in variations]
    return cells[:max_per_row]


PREVIEW_NAME = "augment-preview.png"


def preview_path(out: str) -> Path:
    """OUT/report/augment-preview.png: beside the report, where `shardlight report` writes (local outputs)."""
    return Path(join(out, "report", PREVIEW_NAME))


def augment_preview(out: str, dest_png: str | Path, max_per_row: int = 8) -> Path:
    """Write the contact sheet of OUT's augmentations to `dest_png`; returns its path.

    Args:
        out: a run's output folder (or URL) holding augmented/<shard>.parquet and augmented_images/<shard>.tar.
        dest_png: where to write the PNG.
        max_per_row: samples shown per class.
    """
    generated, varied = collect(out, max_per_row)
    classes = sorted(set(generated) | set(varied))
    if not classes:
        raise FileNotFoundError(f"no augmented images under {join(out, 'augmented')} (is augment.enabled set?)")
    return contact_sheet({label: _row_cells(generated[label], varied[label], max_per_row) for label in classes},
                         dest_png, max_per_row)


def contact_sheet(rows: dict[str, list[tuple[Image.Image, str]]], dest_png: str | Path, max_per_row: int = 8) -> Path:
    """Write a PNG with one labelled row per key of `rows`: its (image, kind) cells, "source" ones framed in blue."""
    width = LABEL_W + max_per_row * (CELL + GAP)
    sheet = Image.new("RGB", (width, len(rows) * (CELL + GAP) + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (label, cells) in enumerate(rows.items()):
        y = GAP + row * (CELL + GAP)
        draw.text((6, y + CELL // 2 - 6), label, fill=(0, 0, 0))
        for col, (image, kind) in enumerate(cells[:max_per_row]):
            x = LABEL_W + col * (CELL + GAP)
            sheet.paste(image.resize((CELL, CELL)), (x, y))
            if kind == "source":  # sources framed in blue, so variations read as "this one, redrawn"
                draw.rectangle([x - 2, y - 2, x + CELL + 1, y + CELL + 1], outline=(40, 80, 220), width=2)
    dest = Path(dest_png)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest
