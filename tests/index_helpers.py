"""Test data for the index tests: synthetic vectors in the real Parquet schema, and a small real run."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shardlight.core.layout import STATS_KEY, run_record_path  # noqa: E402
from shardlight.core.schema import Generation, Row, rows_table, write_table  # noqa: E402


def clustered(n: int, dim: int = 32, clusters: int = 20, spread: float = 0.25, seed: int = 0,
              fresh: int | None = None) -> np.ndarray:
    """Unit vectors around random cluster centres: the shape of real embedding sets.

    `fresh`: new points around the same centres as `seed`'s (queries from the data's distribution).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    if fresh is not None:
        rng = np.random.default_rng([seed, fresh])
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shard(out: str | Path, shard: str, vectors: np.ndarray, labels: list[str] | None = None,
                synthetic: list[bool] | None = None, folder: str = "embeddings", key_prefix: str | None = None,
                tar: tuple[str, list[int], list[int]] | None = None) -> list[str]:
    """One OUT/<folder>/<shard>.parquet in the pipeline's schema; returns the keys.

    `tar` is (source tar url, offsets, sizes) of each row's image member.
    """
    n, dim = vectors.shape
    keys = [f"{key_prefix or shard}_{i:06d}" for i in range(n)]
    labels = labels or ["red circle" if i % 2 else "blue square" for i in range(n)]
    made = [Generation(mode="generate", target_label=labels[i], seed=i, steps=1, guidance=1.0, generator="test")
            if synthetic is not None and synthetic[i] else None for i in range(n)]
    url, offsets, sizes = tar or (None, [None] * n, [None] * n)
    rows = [Row(key=k, shard=shard, caption=f"caption of {k}", url=f"http://example.com/{k}.jpg", width=64, height=64,
                image_format="jpg", tar_offset=offsets[i], tar_size=sizes[i], image_embedding=vectors[i],
                text_embedding=vectors[i], clip_score=0.3, label_id=0, label=labels[i], label_prob=0.9,
                topk_ids=[0], topk_probs=[0.9], generation=made[i]) for i, k in enumerate(keys)]
    stats = {"shard": shard, "url": url, "rows": n}
    path = Path(out) / folder / f"{shard}.parquet"
    write_table(str(path), rows_table(rows, dim), {STATS_KEY: json.dumps(stats).encode()})
    return keys


def make_real_run(root: Path, shards: int = 2, samples_per_shard: int = 24) -> Path:
    """A real output folder: demo shards embedded by the (untrained) demo CLIP and ViT, plus its index."""
    from index.build import build_index
    from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec, RunConfig
    from shardlight.core.storage import list_shards
    from shardlight.training.synthetic import write_shards
    from workers.embed import ShardEmbedder

    data, out = root / "data", root / "out"
    write_shards(data, shards, samples_per_shard, seed=7)
    cfg = RunConfig(input=str(data), output=str(out), clip=ClipSpec(model="shapes-clip"),
                    labels=LabelSpec(kind="vit", model="shapes-vit"), compute=ComputeSpec(device="cpu"))
    embedder = ShardEmbedder(cfg.clip, cfg.labels, cfg.compute)
    for url in list_shards(cfg.input):
        embedder.process(url, str(out))
    run_record = {"config": cfg.model_dump()}
    Path(run_record_path(str(out))).write_text(json.dumps(run_record))
    build_index(str(out), "Flat", model=cfg.clip.model_dump())
    return out


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0):
    """Run `app` with the real uvicorn server on loopback; yields its base URL.

    The server binds port 0 and the URL names the port it got: no probe-then-reuse race with other processes.
    """
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
