"""Decode mechanism, reduced-scale JPEG decode and CPU bf16: the measurements behind issue 18's choices.

    python bench/decode_bench.py mechanism [--images 384] [--rounds 3]   decode alone: inline, threads, processes
    python bench/decode_bench.py worker [--model demo] [--images 192]   ShardEmbedder by decode setting
    python bench/decode_bench.py draft PHOTO.jpg [...]                   cosine of draft vs full decode
    python bench/decode_bench.py precision [--rounds 3]                  bf16 autocast vs fp32 on this CPU

Rates are medians of interleaved rounds (each round runs every setting once, in turn), printed as ratios of
the first setting, with the spread (min-max of the per-round ratio): the dev machine is shared.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import machine  # noqa: E402
from shardlight.core.config import CONFIG_DIR, ClipSpec, ComputeSpec, LabelSpec  # noqa: E402
from shardlight.models.clip import ClipEmbedder  # noqa: E402
from shardlight.models.labelers import build_labeler  # noqa: E402
from shardlight.models.preprocess import open_rgb, to_uint8  # noqa: E402
from shardlight.training.synthetic import write_shards  # noqa: E402
from workers.decode import CpuDecoder, DecodeSpecs  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402
from workers.reader import ShardReader  # noqa: E402

CPU = torch.device("cpu")
SHIPPED_CLIP = ClipSpec(model="shapes-clip", pretrained=str(CONFIG_DIR / "models/shapes-clip.safetensors"))
SHIPPED_VIT = LabelSpec(kind="vit", model="shapes-vit", checkpoint=str(CONFIG_DIR / "models/shapes-vit.safetensors"))


def interleaved(settings: dict, rounds: int) -> None:
    """Run each setting once per round, in turn; print median rate and the per-round ratio's spread."""
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(rounds):
        for name, run in settings.items():
            rates[name].append(run())
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    base = rates[next(iter(settings))]
    print(f"{'setting':<34}{'images/s':>10}{'ratio':>8}  spread")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, base)]
        print(f"{name:<34}{statistics.median(values):>10.1f}{statistics.median(ratios):>8.2f}  "
              f"{min(ratios):.2f}-{max(ratios):.2f}")


def timed(images: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return images / (time.perf_counter() - start)


def mechanism(args) -> None:
    shard = write_shards(Path(tempfile.mkdtemp()), 1, args.images, seed=7, image_size=256)[0]
    clip = ClipEmbedder(ClipSpec(model="ViT-B-32"), CPU)
    specs = DecodeSpecs(clip.pixel_spec)
    decoders = {"inline (feeding thread)": CpuDecoder(specs, workers=0, batch_size=64),
                **{f"{mode} x{n}": CpuDecoder(specs, workers=n, batch_size=64, mode=mode)
                   for mode in ("thread", "process") for n in (1, 2)}}
    for decoder in decoders.values():  # start the pools before the clock
        list(decoder.batches(ShardReader(str(shard))))

    def run(decoder):
        return lambda: timed(args.images, lambda: list(decoder.batches(ShardReader(str(shard)))))

    interleaved({name: run(d) for name, d in decoders.items()}, args.rounds)
    for decoder in decoders.values():
        decoder.close()


def worker(args) -> None:
    data = Path(tempfile.mkdtemp())
    demo = args.model == "demo"  # the demo CLIP + ViT on 64-px shards, else ViT-B-32 (no labels) on 256-px ones
    shard = str(write_shards(data, 1, args.images, seed=7, image_size=64 if demo else 256)[0])
    clip, labels = (SHIPPED_CLIP, SHIPPED_VIT) if demo else (ClipSpec(model="ViT-B-32"), LabelSpec(kind="none"))
    settings = {}
    for name, compute in [("decode inline", {"decode_workers": 0}), ("1 decode process", {"decode_workers": 1}),
                          ("2 decode processes", {"decode_workers": 2})]:
        embedder = ShardEmbedder(clip, labels, ComputeSpec(batch_size=64, threads=args.threads, **compute))
        embedder.process(shard, str(data / "warm"))
        settings[name] = _worker_run(embedder, shard)
    interleaved(settings, args.rounds)


def _worker_run(embedder: ShardEmbedder, shard: str):
    def run() -> float:
        start = time.perf_counter()
        rows = embedder.process(shard, tempfile.mkdtemp())["rows"]
        return rows / (time.perf_counter() - start)
    return run


def photo_crops(paths: list[str], min_side: int, count: int, seed: int = 0) -> tuple[list[bytes], int]:
    """JPEG crops of real photos at their native resolution, each side >= min_side (quality 90)."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in paths]
    photos = [p for p in photos if min(p.size) >= min_side]
    if not photos:
        return [], 0
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w = rng.randint(min_side, photo.width)
        h = rng.randint(min_side, photo.height)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        buf = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, len(photos)


def draft(args) -> None:
    """Embedding cosine of a reduced-scale decode vs a full one, drafting to 1x and to 2x the resize."""
    for clip_spec, name in [(ClipSpec(model="ViT-B-32"), "ViT-B-32 (random weights)"), (SHIPPED_CLIP, "shapes-clip")]:
        clip = ClipEmbedder(clip_spec, CPU)
        spec = clip.pixel_spec
        for factor in (1, 2):
            target = factor * spec.resize
            crops, used = photo_crops(args.photos, 2 * target, args.images)
            if not crops:
                print(f"{name}, draft to {factor}x resize: no photo has both sides >= {2 * target}")
                continue

            def embed(draft_to, crops=crops):
                px = torch.stack([torch.from_numpy(to_uint8(open_rgb(c, draft_to)[0], spec)) for c in crops])
                return clip.embed_images(px)

            cos = (embed(None) * embed(target)).sum(1)
            t_full = min(timed(len(crops), lambda: [open_rgb(c) for c in crops]) for _ in range(3))
            t_draft = min(timed(len(crops), lambda: [open_rgb(c, target) for c in crops]) for _ in range(3))
            print(f"{name}, draft to {factor}x resize ({target}px): {len(crops)} crops of {used} photos (sides >= "
                  f"{2 * target}): cosine min {cos.min():.4f} median {np.median(cos):.4f}; "
                  f"decode {t_full:.0f} -> {t_draft:.0f} images/s ({t_draft / t_full:.2f}x)", flush=True)


def precision(args) -> None:
    images = torch.randint(0, 255, (args.images, 3, 224, 224), dtype=torch.uint8)
    small = torch.from_numpy(np.stack([to_uint8(Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
                                                ClipEmbedder(SHIPPED_CLIP, CPU).pixel_spec)
                                       for s in _shapes(args.images)]))
    captions = [s["txt"].decode() for s in _shapes(args.images)]
    for name, clip_spec, label_spec, px in [("ViT-B-32", ClipSpec(model="ViT-B-32"), None, images),
                                           ("demo", SHIPPED_CLIP, SHIPPED_VIT, small)]:
        runs = {}
        for dtype in (torch.float32, torch.bfloat16):
            clip = ClipEmbedder(clip_spec, CPU, dtype)
            labeler = build_labeler(label_spec, CPU, dtype, clip) if label_spec else None
            runs[dtype] = (clip, labeler)

        def forward(dtype):
            clip, labeler = runs[dtype]
            emb = clip.embed_images(px)
            return emb, clip.embed_texts(captions), labeler(px).ids[:, 0] if labeler else None

        out = {d: forward(d) for d in runs}
        cos_img = (out[torch.float32][0] * out[torch.bfloat16][0]).sum(1)
        cos_txt = (out[torch.float32][1] * out[torch.bfloat16][1]).sum(1)
        agree = (out[torch.float32][2] == out[torch.bfloat16][2]).mean() if label_spec else float("nan")
        print(f"{name}: cosine image min {cos_img.min():.4f} text min {cos_txt.min():.4f}; "
              f"label agreement {agree:.3f}")
        interleaved({f"{name} fp32": lambda: timed(len(px), lambda: forward(torch.float32)),
                     f"{name} bf16": lambda: timed(len(px), lambda: forward(torch.bfloat16))}, args.rounds)


def _shapes(n: int) -> list[dict]:
    from shardlight.training.synthetic import sample

    rng = random.Random(11)
    return [sample(rng, f"p{i:04d}") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["mechanism", "worker", "draft", "precision"])
    parser.add_argument("photos", nargs="*", help="real JPEG photos (draft)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", choices=["ViT-B-32", "demo"], default="ViT-B-32", help="worker: which models")
    args = parser.parse_args()
    args.images = args.images or {"mechanism": 384, "worker": 192, "draft": 120, "precision": 64}[args.what]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(), f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    {"mechanism": mechanism, "worker": worker, "draft": draft, "precision": precision}[args.what](args)


if __name__ == "__main__":
    main()
