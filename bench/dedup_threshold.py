"""Cosine similarity of near-duplicates vs distinct images, per CLIP model: the evidence behind `dedup`'s default.

    .venv/bin/python bench/dedup_threshold.py                      # the demo CLIP, trained and untrained
    .venv/bin/python bench/dedup_threshold.py --models ViT-B-32 --images 48   # a random ViT-B-32 too

Each demo image (`shardlight.training.synthetic`, classes balanced) is embedded with the copies a crawled
dataset really holds as duplicates: JPEG re-encodes (quality 75 and 40), a resize to half size and back,
centre crops of 90% and 80% (resized back), a horizontal flip and +15% brightness. Distinct images are
every other image of the same class and of other classes. Printed per model: each kind's minimum, 5th
percentile and median cosine to its original, and for each candidate threshold the share of each kind at or
above it (a good threshold keeps the duplicates above it and the distinct images below). Results and the
choice made from them: docs/index.md, "Near-duplicates".
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shardlight.core.config import CONFIG_DIR, ClipSpec
from shardlight.models.clip import ClipEmbedder
from shardlight.training.synthetic import CLASS_NAMES, random_scene, render

THRESHOLDS = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dw, dh, w - dw, h - dh)).resize((w, h), Image.BICUBIC)


VARIANTS = {
    "jpeg q75": lambda im: _jpeg(im, 75),
    "jpeg q40": lambda im: _jpeg(im, 40),
    "half size and back": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR).resize(im.size),
    "crop 90%": lambda im: _crop(im, 0.9),
    "crop 80%": lambda im: _crop(im, 0.8),
    "flip": ImageOps.mirror,
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
}


def images(n: int, seed: int, size: int) -> tuple[list[Image.Image], np.ndarray]:
    """n demo images, classes in turn (so every class has several), saved as the demo saves them (JPEG q92)."""
    rng = random.Random(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    return [_jpeg(render(random_scene(rng, int(c)), rng, size), 92) for c in labels], labels


def embed(embedder: ClipEmbedder, batch: list[Image.Image]) -> np.ndarray:
    out = []
    for i in range(0, len(batch), 32):
        out.append(embedder.embed_images(torch.stack([embedder.preprocess(im) for im in batch[i:i + 32]])))
    return np.concatenate(out)


def similarities(embedder: ClipEmbedder, originals: list[Image.Image], labels: np.ndarray) -> dict[str, np.ndarray]:
    base = embed(embedder, originals)
    kinds = {name: (embed(embedder, [f(im) for im in originals]) * base).sum(axis=1) for name, f in VARIANTS.items()}
    pairs = base @ base.T
    upper = np.triu(np.ones_like(pairs, dtype=bool), k=1)
    same = labels[:, None] == labels[None, :]
    kinds["distinct, same class"] = pairs[upper & same]
    kinds["distinct, other class"] = pairs[upper & ~same]
    return kinds


def table(kinds: dict[str, np.ndarray]) -> str:
    head = f"{'kind':24s} {'n':>5s} {'min':>7s} {'p5':>7s} {'median':>7s}  " + " ".join(f"≥{t:<6g}" for t in THRESHOLDS)
    lines = [head]
    for name, v in kinds.items():
        shares = " ".join(f"{(v >= t).mean():7.2f}" for t in THRESHOLDS)
        lines.append(f"{name:24s} {len(v):5d} {v.min():7.4f} {np.percentile(v, 5):7.4f} {np.median(v):7.4f}  {shares}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the demo's is 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=["shapes-clip:trained", "shapes-clip"],
                        help="open_clip names; NAME:trained loads the repo's weights configs/models/NAME.safetensors")
    args = parser.parse_args()
    originals, labels = images(args.images, args.seed, args.size)
    for name in args.models:
        model, _, trained = name.partition(":")
        weights = str(CONFIG_DIR / "models" / f"{model}.safetensors") if trained else None
        embedder = ClipEmbedder(ClipSpec(model=model, pretrained=weights), torch.device("cpu"))
        print(f"\n## {model} ({'trained: ' + Path(weights).name if weights else 'untrained, seed 0'}), "
              f"{len(originals)} images of {args.size}px")
        print(table(similarities(embedder, originals, labels)))


if __name__ == "__main__":
    main()
