"""Embedding throughput, as ratios against a bare model forward measured in the same run.

    python bench/embed_throughput.py [--config configs/demo.yaml] [--shards 4] [--samples-per-shard 256]

Prints images/s for:
  forward     CLIP image+text forward and the labeler on pre-decoded, pre-transformed tensors
  worker      ShardEmbedder.process in this process: read tar, decode, transform, forward, write Parquet
  flow-stage  the Prefect flow's embedding stage on local Ray, including Ray start and actor model load
  flow-total  the whole flow: Prefect, Ray start, actor model load, embedding, index build
and each as a ratio of `forward`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import machine, print_ratios  # noqa: E402
from shardlight.core.config import CONFIG_DIR, load_config  # noqa: E402
from shardlight.training.synthetic import write_shards  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402
from workers.reader import RawSample, ShardReader, decode  # noqa: E402


def bare_forward(embedder: ShardEmbedder, shards: list[Path]) -> float:
    """images/s of the models alone: every image decoded and transformed before the clock starts."""
    prepared = []
    for shard in shards:
        for raw in ShardReader(str(shard)):
            if isinstance(raw, RawSample):
                prepared.append((embedder._prepare(decode(raw)), raw.caption))
    bs = embedder.batch_size
    start = time.perf_counter()
    for i in range(0, len(prepared), bs):
        chunk = prepared[i: i + bs]
        image_emb = embedder.clip.embed_images(torch.stack([p[1] for p, _ in chunk]))
        embedder.clip.embed_texts([c for _, c in chunk])
        if embedder.labeler is not None:
            px = None if embedder.labeler.uses_clip_pixels else torch.stack([p[2] for p, _ in chunk])
            embedder.labeler(px, image_emb)
    return len(prepared) / (time.perf_counter() - start)


def in_process_worker(embedder: ShardEmbedder, shards: list[Path], out: Path) -> float:
    start = time.perf_counter()
    rows = sum(embedder.process(str(s), str(out))["rows"] for s in shards)
    return rows / (time.perf_counter() - start)


def whole_flow(config: Path, data: Path, out: Path) -> tuple[float, float]:
    from flows.pipeline import pipeline

    cfg = load_config(config, input=str(data), output=str(out))
    start = time.perf_counter()
    summary = pipeline(cfg.model_dump())
    total = time.perf_counter() - start
    return summary["images_per_s"], summary["rows"] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "demo.yaml")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--skip-flow", action="store_true", help="only forward and worker (no Ray/Prefect)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="shardlight-bench-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
        shards = write_shards(tmp / "data", args.shards, args.samples_per_shard, seed=99)
        cfg = load_config(args.config)
        embedder = ShardEmbedder(cfg.clip, cfg.labels, cfg.compute)
        bare_forward(embedder, shards[:1])  # warm-up
        forward = bare_forward(embedder, shards)
        worker = in_process_worker(embedder, shards, tmp / "worker-out")
        describe = ", ".join(f"{k} {v}" for k, v in embedder.describe().items() if k != "dim")
        del embedder
        if not args.skip_flow:
            stage, total = whole_flow(args.config, tmp / "data", tmp / "flow-out")

    n = args.shards * args.samples_per_shard
    print(f"\n{machine()}; config {args.config.name} ({describe}); {n} images in {args.shards} shards")
    rows = [("forward", forward), ("worker", worker)]
    if not args.skip_flow:
        rows += [("flow-stage", stage), ("flow-total", total)]
    print_ratios(rows, "÷ forward")


if __name__ == "__main__":
    main()
