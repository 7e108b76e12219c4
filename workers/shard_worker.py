"""The worker the flow runs on each Ray actor: embed a shard, then (when enabled) augment it.

One actor holds CLIP and the labeler once for both stages — the augmenter scores and labels its images
with the embedder's models — so a run with augmentation loads every model once per actor, not once per
stage. Each half is skipped when its output already exists, which is what makes a re-run resume: a shard
embedded by an earlier run (say, before augmentation was switched on) is only augmented.
"""

from __future__ import annotations

from collections.abc import Callable

from shardlight.core.config import AugmentSpec, ClipSpec, ComputeSpec, LabelSpec, RunConfig
from shardlight.core.errors import first_line
from shardlight.core.layout import augment_done, shard_done
from shardlight.core.storage import shard_name
from workers.pool import PoolPlan, PoolResult, run_stage, start_ahead


class ShardWorker:
    """`process(shard_url, out)` -> {"shard", "embed": stats | None, "augment": stats | None, "augment_error"}."""

    def __init__(self, clip: ClipSpec, labels: LabelSpec, compute: ComputeSpec, augment: AugmentSpec):
        # Imported here, in the actor: the driver names this class to Ray without loading torch and the models'
        # code, so a run can start its actors ahead while the driver is still importing (flows/ahead.py).
        from workers.augment import ShardAugmenter
        from workers.embed import ShardEmbedder

        self.embedder = ShardEmbedder(clip, labels, compute)
        self.augmenter = (ShardAugmenter(augment, clip, labels, compute,
                                         models=(self.embedder.clip, self.embedder.labeler))
                          if augment.enabled else None)

    def describe(self) -> dict:
        info = self.embedder.describe()
        if self.augmenter is not None:
            info["augment"] = self.augmenter.describe()
        return info

    def close(self) -> None:
        """Shut down the embedder's helper processes (decode, text, reading)."""
        self.embedder.close()

    def process(self, shard_url: str, out: str) -> dict:
        result = {"shard": shard_name(shard_url), "embed": None, "augment": None, "augment_error": None}
        if not shard_done(out, shard_url):
            result["embed"] = self.embedder.process(shard_url, out)
        if self.augmenter is not None and not augment_done(out, shard_url):
            # The shard's embeddings are written and count as done; a failed augmentation is reported on its
            # own (and retried by the next run) rather than failing the shard.
            try:
                result["augment"] = self.augmenter.process(shard_url, out)
            except Exception as err:  # noqa: BLE001 - reported per shard, like a dead worker's shard
                result["augment_error"] = first_line(err)[:300]
        return result


def process_shards(cfg: RunConfig, out: str, shards: list[str], on_done: Callable[[dict], None] | None = None,
                   on_ready: Callable[[], None] | None = None) -> PoolResult:
    """The run's shard work: CLIP embeddings and labels, then DiT augmentations when enabled, one actor pool."""
    return run_stage(cfg, out, shards, ShardWorker, _worker_args(cfg), on_done, on_ready)


def start_shard_workers_ahead(cfg: RunConfig, shards: int) -> PoolPlan:
    """Start the actors `process_shards` will use for `shards` shards now (Ray must be up): see workers/pool.py."""
    return start_ahead(cfg, shards, ShardWorker, _worker_args(cfg))


def _worker_args(cfg: RunConfig) -> tuple:
    return (cfg.clip, cfg.labels, cfg.compute, cfg.augment)
