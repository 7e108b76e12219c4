"""Photo-like image-text shards in img2dataset's layout, for GPU-decode tests and throughput benchmarks.

No real photos are available offline, so images imitate what matters to a JPEG decoder and a resize: smooth
colour gradients (sky, walls), soft blobs and hard-edged shapes (objects), and sensor-like noise, encoded
at img2dataset's defaults (256 px, quality 95, 4:2:0). Captions are web alt-text-like sentences of 4-30
words. Everything is deterministic for a seed; shards are written in parallel processes when asked.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

_SUBJECTS = ("a woman", "a man", "two children", "a golden retriever", "a tabby cat", "a red vintage car",
             "a wooden table", "a bowl of fresh fruit", "an old stone bridge", "a city skyline", "a sailing boat",
             "a mountain lake", "a cup of coffee", "a modern kitchen", "a leather handbag", "a pair of sneakers",
             "a bouquet of roses", "a snowy forest", "a desert road", "a plate of pasta")
_ACTIONS = ("standing next to", "sitting on", "walking along", "in front of", "under", "near", "on top of",
            "reflected in", "surrounded by", "overlooking")
_PLACES = ("the beach at sunset", "a busy street", "a green meadow", "a white background", "the window",
           "a rainy afternoon", "an autumn park", "a cozy living room", "the harbour", "a wooden fence")
_EXTRAS = ("stock photo", "high resolution", "royalty free image", "vector illustration", "4k wallpaper",
           "close-up", "vintage style", "for sale", "free shipping", "HD", "premium quality", "2019 collection")


def caption(rng: random.Random) -> str:
    """One alt-text-like caption: a subject, a relation, a place, and sometimes shop or photo-site words."""
    words = [rng.choice(_SUBJECTS), rng.choice(_ACTIONS), rng.choice(_PLACES)]
    if rng.random() < 0.5:
        words.append(", ".join(rng.sample(_EXTRAS, rng.randint(1, 4))))
    text = " ".join(words)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def photo_like(rng: random.Random, width: int, height: int) -> Image.Image:
    """Gradient background, soft blobs, a few sharp shapes, then sensor-like noise: a photo's spectrum."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    top, bottom = nrng.uniform(0, 255, 3).astype(np.float32), nrng.uniform(0, 255, 3).astype(np.float32)
    angle = nrng.uniform(0, np.pi)
    x = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle))
    y = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle))
    t = ((y[:, None] + x[None, :]) / np.float32(max(width, height)))[..., None]
    img = Image.fromarray(np.clip(top + (bottom - top) * t, 0, 255).astype(np.uint8))
    # Blobs drawn at 1/4 scale, blurred there and scaled up: soft edges for a fraction of the cost.
    small = (max(1, width // 4), max(1, height // 4))
    blobs = Image.new("RGB", small)
    draw = ImageDraw.Draw(blobs)
    for _ in range(rng.randint(2, 6)):
        cx, cy, r = rng.uniform(0, small[0]), rng.uniform(0, small[1]), rng.uniform(0.1, 0.4) * min(small)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    blobs = blobs.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4))).resize((width, height), Image.Resampling.BILINEAR)
    img = Image.blend(img, blobs, rng.uniform(0.3, 0.7))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        box = [x0, y0, x0 + rng.uniform(10, width * 0.5), y0 + rng.uniform(10, height * 0.5)]
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    noise = nrng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(rng.uniform(2, 10))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def _size(rng: random.Random, side: int) -> tuple[int, int]:
    """img2dataset's default `border` mode gives side × side; one in ten keeps a ratio (shortest side = side)."""
    if rng.random() < 0.9:
        return side, side
    long = int(side * rng.uniform(1.2, 1.8))
    return (long, side) if rng.random() < 0.5 else (side, long)


def sample(rng: random.Random, key: str, side: int = 256, quality: int = 95) -> dict:
    """One WebDataset sample (`__key__`, `jpg`, `txt`, `json`) with img2dataset's metadata fields."""
    width, height = _size(rng, side)
    img = photo_like(rng, width, height)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    text = caption(rng)
    meta = {"url": f"https://example.com/images/{key}.jpg", "key": key, "status": "success",
            "error_message": None, "width": width, "height": height,
            "original_width": int(width * rng.uniform(1, 4)), "original_height": int(height * rng.uniform(1, 4)),
            "exif": "{}", "sha256": f"{rng.getrandbits(256):064x}", "caption": text}
    return {"__key__": key, "jpg": buf.getvalue(), "txt": text.encode(), "json": json.dumps(meta).encode()}


def _write_shard(args: tuple) -> str:
    out, shard, per_shard, seed, side = args
    rng = random.Random(f"{seed}-{shard}")
    path = Path(out) / f"{shard:05d}.tar"
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for i in range(per_shard):
            sink.write(sample(rng, f"{shard:05d}{i:04d}", side))
    tmp.replace(path)
    return str(path)


def write_photo_shards(out_dir: str | Path, shards: int, samples_per_shard: int, seed: int = 0,
                       side: int = 256, processes: int = 1) -> list[Path]:
    """Write shards 00000.tar … of photo-like samples; `processes` > 1 writes shards in parallel."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), s, samples_per_shard, seed, side) for s in range(shards)]
    if processes <= 1 or shards == 1:
        return [Path(_write_shard(j)) for j in jobs]
    # spawn: a caller may already run threads or hold a CUDA context, which a forked child must not inherit
    with ProcessPoolExecutor(min(processes, shards), mp_context=multiprocessing.get_context("spawn")) as pool:
        return [Path(p) for p in pool.map(_write_shard, jobs)]
