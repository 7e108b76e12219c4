"""The per-shard worker: decode in a background thread, embed with CLIP, label, write Parquet.

`ShardEmbedder` loads its models once and then turns one shard into one embeddings file and one errors
file. The embeddings file is written last and is the shard's "done" marker.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import defaultdict
from typing import Iterator

import numpy as np
import torch

from workers.config import ClipSpec, ComputeSpec, LabelSpec
from workers.device import pick_batch_size, pick_device, pick_dtype
from workers.models import ClipEmbedder, build_labeler
from workers.reader import DecodedSample, SampleError, ShardReader, decode
from workers.schema import STATS_KEY, embeddings_path, embeddings_table, errors_path, errors_table, write_table
from workers.storage import exists, shard_name

_DONE = object()


class ShardEmbedder:
    """CLIP image/text embeddings and labels for whole shards; load once, call per shard."""

    def __init__(self, clip: ClipSpec, labels: LabelSpec, compute: ComputeSpec):
        self.device = pick_device(compute.device)
        self.dtype = pick_dtype(self.device, compute.precision)
        self.batch_size = pick_batch_size(self.device, compute.batch_size)
        self.prefetch = compute.prefetch_batches
        self.clip = ClipEmbedder(clip, self.device, self.dtype)
        self.labeler = build_labeler(labels, self.device, self.dtype, self.clip)
        self.top_k = labels.top_k

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.batch_size, "dim": self.clip.dim}

    def process(self, shard_url: str, out: str) -> dict:
        """Embed one shard and write its outputs; returns the shard's stats."""
        start = time.perf_counter()
        reader = ShardReader(shard_url)
        errors: list[SampleError] = []
        cols: dict[str, list] = defaultdict(list)
        for batch in self._batches(reader, errors):
            self._compute(batch, cols)
        if reader.problem:
            errors.append(SampleError(None, reader.name, "shard", reader.problem, dropped=False))
        rows = len(cols["key"])
        dropped = sum(e.dropped for e in errors)
        stats = {
            "shard": reader.name, "url": shard_url, "samples_read": rows + dropped, "rows": rows,
            "errors": dropped, "notes": len(errors) - dropped, "problem": reader.problem,
            "no_caption": sum(c is None for c in cols["caption"]),
            "seconds": round(time.perf_counter() - start, 3),
        }
        stats["images_per_s"] = round(rows / max(stats["seconds"], 1e-9), 2)
        write_table(errors_path(out, reader.name), errors_table(errors))
        table = embeddings_table(cols, self.clip.dim, self.top_k)
        write_table(embeddings_path(out, reader.name), table, {STATS_KEY: json.dumps(stats).encode()})
        return stats

    def _prepare(self, sample: DecodedSample) -> tuple:
        clip_px = self.clip.preprocess(sample.image)
        label_px = None
        if self.labeler is not None and not self.labeler.uses_clip_pixels:
            label_px = self.labeler.transform(sample.image)
        return sample, clip_px, label_px

    def _batches(self, reader: ShardReader, errors: list) -> Iterator[list]:
        """Decode and preprocess on a thread, so decoding overlaps the model's forward pass."""
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)

        def produce() -> None:
            batch: list = []
            try:
                for item in reader:
                    if isinstance(item, SampleError):
                        errors.append(item)
                        continue
                    if item.metadata_error:
                        errors.append(SampleError(item.key, item.shard, "metadata", item.metadata_error, False))
                    decoded = decode(item)
                    if isinstance(decoded, SampleError):
                        errors.append(decoded)
                        continue
                    batch.append(self._prepare(decoded))
                    if len(batch) == self.batch_size:
                        ready.put(batch)
                        batch = []
                if batch:
                    ready.put(batch)
                ready.put(_DONE)
            except BaseException as err:  # re-raised on the consuming thread
                ready.put(err)

        thread = threading.Thread(target=produce, name=f"decode-{reader.name}", daemon=True)
        thread.start()
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()

    def _compute(self, batch: list, cols: dict) -> None:
        samples = [s for s, _, _ in batch]
        image_emb = self.clip.embed_images(torch.stack([px for _, px, _ in batch]))
        captions = [s.raw.caption for s in samples]
        with_text = [i for i, c in enumerate(captions) if c is not None]
        text_emb = np.zeros_like(image_emb)
        if with_text:
            text_emb[with_text] = self.clip.embed_texts([captions[i] for i in with_text])
        scores = (image_emb * text_emb).sum(axis=1)
        labels = None
        if self.labeler is not None:
            label_px = None if self.labeler.uses_clip_pixels else torch.stack([px for _, _, px in batch])
            labels = self.labeler(label_px, image_emb)
        for i, s in enumerate(samples):
            raw = s.raw
            cols["key"].append(raw.key)
            cols["shard"].append(raw.shard)
            cols["caption"].append(raw.caption)
            cols["url"].append(raw.meta.get("url") if isinstance(raw.meta.get("url"), str) else None)
            cols["width"].append(s.width)
            cols["height"].append(s.height)
            cols["image_format"].append(raw.image_format)
            cols["tar_offset"].append(raw.tar_offset)
            cols["tar_size"].append(raw.tar_size)
            cols["image_embedding"].append(image_emb[i])
            cols["text_embedding"].append(text_emb[i])
            cols["clip_score"].append(float(scores[i]) if raw.caption is not None else None)
            cols["label_id"].append(int(labels.ids[i, 0]) if labels else None)
            cols["label"].append(labels.names[i] if labels else None)
            cols["label_prob"].append(float(labels.probs[i, 0]) if labels else None)
            cols["topk_ids"].append(labels.ids[i].tolist() if labels else None)
            cols["topk_probs"].append(labels.probs[i].tolist() if labels else None)
            cols["meta"].append(raw.meta)


def shard_done(out: str, shard_url: str) -> bool:
    return exists(embeddings_path(out, shard_name(shard_url)))
