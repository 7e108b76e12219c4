"""DiT generation throughput at the demo size, as ratios against the bare denoiser measured in the same run.

    python bench/generate_throughput.py [--config configs/demo.yaml] [--images 96] [--batch-size N] [--checkpoint F]

Prints images/s for:
  denoiser   the forward-bound rate: DiT forward passes/s (batch doubled for guidance) ÷ DDIM steps
  generate   DiTGenerator.generate: seeded noise, DDIM with classifier-free guidance, decode to images
  vary       DiTGenerator.vary: encode sources, SDEdit noise to `strength`, fewer DDIM steps, decode
  shard      ShardAugmenter.process on an embedded shard: generate + vary, CLIP score, ViT labels, tar + Parquet
and each as a ratio of `denoiser` (vary can exceed 1: it runs only strength × steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import machine, print_ratios  # noqa: E402
from shardlight.core.config import CONFIG_DIR, load_config  # noqa: E402
from shardlight.models.device import autocast, pick_device, pick_dtype  # noqa: E402
from shardlight.models.sampler import DiTGenerator  # noqa: E402
from shardlight.training.synthetic import write_shards  # noqa: E402
from workers.augment import ShardAugmenter  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def denoiser_rate(gen: DiTGenerator, batch: int, steps: int, guidance: float, repeats: int = 5) -> float:
    """Images/s if sampling cost nothing but the DiT forward passes (same batch, same guidance doubling)."""
    factor = 1 if guidance == 1.0 else 2
    x = torch.randn(batch * factor, *gen.shape, device=gen.device)
    t = torch.full((batch * factor,), 500, device=gen.device, dtype=torch.long)
    y = torch.zeros(batch * factor, dtype=torch.long, device=gen.device)
    with torch.inference_mode(), autocast(gen.device, gen.dtype):
        gen.model(x, t, y)  # warm-up
        _sync(gen.device)
        start = time.perf_counter()
        for _ in range(repeats):
            gen.model(x, t, y)
        _sync(gen.device)
    passes_per_s = repeats / (time.perf_counter() - start)
    return passes_per_s * batch / steps


def timed(fn, n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "demo.yaml")
    parser.add_argument("--images", type=int, default=96, help="images generated (and varied) per measure")
    parser.add_argument("--batch-size", type=int, default=None, help="default: augment.batch_size of the config")
    parser.add_argument("--checkpoint", default=None, help="DiT weights instead of the config's augment.checkpoint")
    args = parser.parse_args()

    cfg = load_config(args.config)
    spec = cfg.augment if args.checkpoint is None else cfg.augment.model_copy(update={"checkpoint": args.checkpoint})
    device = pick_device(cfg.compute.device)
    dtype = pick_dtype(device, cfg.compute.precision)
    gen = DiTGenerator(spec.checkpoint, spec.model, spec.vae, device, dtype)
    steps = spec.steps or gen.default_steps
    guidance = gen.default_guidance if spec.guidance is None else spec.guidance
    batch = args.batch_size or spec.batch_size
    n = max(batch, args.images // batch * batch)
    labels = [i % len(gen.class_names) for i in range(n)]

    def generate() -> list:
        return [img for i in range(0, n, batch)
                for img in gen.generate(labels[i:i + batch], list(range(i, i + batch)), steps, guidance)]

    gen.generate(labels[:batch], list(range(batch)), 2, guidance)  # warm-up
    denoiser = denoiser_rate(gen, batch, steps, guidance)
    generated = timed(generate, n, device)
    sources = generate()
    vary = timed(lambda: [gen.vary(sources[i:i + batch], labels[i:i + batch], list(range(i, i + batch)),
                                   spec.strength, steps, guidance) for i in range(0, n, batch)], n, device)

    with tempfile.TemporaryDirectory(prefix="shardlight-bench-") as tmp:
        shard = write_shards(Path(tmp) / "data", 1, 4 * len(gen.class_names), seed=7)[0]
        ShardEmbedder(cfg.clip, cfg.labels, cfg.compute).process(str(shard), tmp)
        augmenter = ShardAugmenter(spec.model_copy(update={"batch_size": batch}), cfg.clip, cfg.labels, cfg.compute)
        start = time.perf_counter()
        stats = augmenter.process(str(shard), tmp)
        _sync(device)
        shard_rate = stats["generated"] / (time.perf_counter() - start)

    print(f"\n{machine()}; {device.type} {str(dtype)[6:]}; "
          f"{gen.name} {gen.shape[1]}px, {steps} DDIM steps, guidance {guidance}, strength {spec.strength}, "
          f"batch {batch}, {n} images; shard: {stats['generated']} images ({stats['by_mode']})")
    print_ratios([("denoiser", denoiser), ("generate", generated), ("vary", vary), ("shard", shard_rate)],
                 "÷ denoiser")


if __name__ == "__main__":
    main()
