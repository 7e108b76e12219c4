"""The worker the flow runs on each Ray actor: embed a shard, then (when enabled) augment it.

One actor holds CLIP and the labeler once for both stages — the augmenter scores and labels its images
with the embedder's models — so a run with augmentation loads every model once per actor, not once per
stage. Each half is skipped when its output already exists, which is what makes a re-run resume: a shard
embedded by an earlier run (say, before augmentation was switched on) is only augmented.
"""

from __future__ import annotations

from workers.augment import ShardAugmenter, augment_done
from workers.config import AugmentSpec, ClipSpec, ComputeSpec, LabelSpec
from workers.embed import ShardEmbedder, shard_done
from workers.storage import shard_name


class ShardWorker:
    """`process(shard_url, out)` -> {"shard", "embed": stats | None, "augment": stats | None, "augment_error"}."""

    def __init__(self, clip: ClipSpec, labels: LabelSpec, compute: ComputeSpec, augment: AugmentSpec):
        self.embedder = ShardEmbedder(clip, labels, compute)
        self.augmenter = (ShardAugmenter(augment, clip, labels, compute,
                                         models=(self.embedder.clip, self.embedder.labeler))
                          if augment.enabled else None)

    def describe(self) -> dict:
        info = self.embedder.describe()
        if self.augmenter is not None:
            info["augment"] = self.augmenter.describe()
        return info

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
                result["augment_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return result


def stages_todo(out: str, shards: list[str], augment: bool) -> list[str]:
    """Shards with a stage still to run: not embedded, or (with augmentation on) not augmented."""
    return [s for s in shards if not shard_done(out, s) or (augment and not augment_done(out, s))]
