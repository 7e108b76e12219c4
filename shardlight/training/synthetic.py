"""Synthetic image-text data: rendered shape scenes with varied captions, in img2dataset's layout.

Every sample is one coloured shape on a plain background. The class label is "<color> <shape>"
so that a classifier, CLIP retrieval and a DiT can all be checked against ground truth.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 210, 180),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.22, 0.32), "medium": (0.34, 0.46), "large": (0.48, 0.62)}
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "top left": (0.3, 0.3), "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
}

# Class ids are stable: sorted by (color, shape) declaration order.
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)


def same_colour_other_shapes() -> list[list[int]]:
    """For each class, the classes of its colour with the other shapes: what a demo DiT's guidance may steer
    away from instead of the null class, so that it separates shapes rather than colours (docs/dit.md)."""
    pairs = [name.split(" ") for name in CLASS_NAMES]
    return [[CLASS_NAMES.index(f"{colour} {other}") for other in SHAPES if other != shape] for colour, shape in pairs]


# Caption templates used for training data. EVAL_TEMPLATES are phrasings never seen in training.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape}",
    "a {size} {color} {shape} on a {background} background",
    "a photo of a {color} {shape}",
    "{color} {shape} in the {position}",
    "a drawing of a {size} {color} {shape}",
    "there is a {color} {shape} near the {position}",
    "an image showing one {color} {shape}",
    "a {background} picture with a {color} {shape}",
    "simple {color} {shape} icon",
    "the {shape} is {color}",
)
EVAL_TEMPLATES: tuple[str, ...] = (
    "a rendering of a {color} {shape}",
    "one {color} {shape}, nothing else",
    "{color} coloured {shape}",
)


@dataclass(frozen=True)
class Scene:
    """Ground truth for one rendered sample."""

    color: str
    shape: str
    size: str
    position: str
    background: str
    rotation: float

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def label_id(self) -> int:
        return CLASS_NAMES.index(self.label)


def random_scene(rng: random.Random, label_id: int | None = None) -> Scene:
    """Draw a scene; `label_id` fixes the class (used for balanced training sets)."""
    if label_id is None:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    else:
        color, shape = CLASS_NAMES[label_id].split(" ")
    return Scene(color=color, shape=shape, size=rng.choice(list(SIZES)),
                 position=rng.choice(list(POSITIONS)), background=rng.choice(list(BACKGROUNDS)),
                 rotation=rng.uniform(0, 360))


def _polygon(cx: float, cy: float, radius: float, points: int, rotation: float,
             inner: float | None = None) -> list[tuple[float, float]]:
    vertices = []
    step = 2 * math.pi / points
    for i in range(points):
        angle = math.radians(rotation) + i * step
        vertices.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        if inner is not None:
            mid = angle + step / 2
            vertices.append((cx + inner * radius * math.cos(mid), cy + inner * radius * math.sin(mid)))
    return vertices


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Render a scene with mild jitter in colour, size and position so no two images are equal."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    lo, hi = SIZES[scene.size]
    radius = rng.uniform(lo, hi) * size / 2
    px, py = POSITIONS[scene.position]
    cx = (px + rng.uniform(-0.05, 0.05)) * size
    cy = (py + rng.uniform(-0.05, 0.05)) * size
    fill = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLORS[scene.color])
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif scene.shape == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.1, 4, scene.rotation), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.15, 3, scene.rotation), fill=fill)
    elif scene.shape == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 5, scene.rotation, inner=0.45), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return img


def caption(scene: Scene, rng: random.Random, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    return rng.choice(templates).format(color=scene.color, shape=scene.shape, size=scene.size,
                                        position=scene.position, background=scene.background)


def sample(rng: random.Random, key: str, image_size: int = 64, label_id: int | None = None,
           templates: tuple[str, ...] = TRAIN_TEMPLATES) -> dict:
    """One WebDataset sample dict (`__key__`, `jpg`, `txt`, `json`) with img2dataset-like metadata."""
    scene = random_scene(rng, label_id)
    img = render(scene, rng, image_size)
    text = caption(scene, rng, templates)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    meta = {
        "key": key, "url": f"synthetic://shapes/{key}.jpg", "caption": text, "status": "success",
        "width": image_size, "height": image_size,
        "label": scene.label, "label_id": scene.label_id, "shape": scene.shape, "color": scene.color,
        "size": scene.size, "position": scene.position, "background": scene.background,
    }
    return {"__key__": key, "jpg": buf.getvalue(), "txt": text.encode(), "json": json.dumps(meta).encode()}


def write_shards(out_dir: str | Path, shards: int, samples_per_shard: int, seed: int,
                 image_size: int = 64, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[Path]:
    """Write `shards` tar files named 00000.tar … deterministically for `seed`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        rng = random.Random(f"{seed}-{shard}")
        path = out / f"{shard:05d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed mtime: same seed, same bytes
            for i in range(samples_per_shard):
                key = f"{shard:05d}{i:04d}"
                # Balanced classes: cycle through every class, then shuffle its scene details.
                label_id = (shard * samples_per_shard + i + seed) % len(CLASS_NAMES)
                sink.write(sample(rng, key, image_size, label_id, templates))
        tmp.replace(path)
        paths.append(path)
    return paths
