"""The per-shard worker: decode in parallel (workers/decode.py), embed with CLIP, label, write Parquet.

`ShardEmbedder` loads its models once, sets torch's threads from the CPUs it holds (workers/cpus.py), and
then turns one shard into one embeddings file and one errors file. Its decoder hands it fixed-size uint8
batches in shard order, with the error records of the samples in between; the embeddings file is written
last and is the shard's "done" marker.

Images are embedded batch by batch; captions wait for a window of several batches (`text_window`) and are
embedded together, sorted by length across the window, so a caption runs beside others of its length rather
than beside its own batch's longest (docs/benchmarks.md). Rows are built when their captions are done, in
batch order: the window changes no row, its order, or its vectors beyond float rounding.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec
from shardlight.core.layout import STATS_KEY, embeddings_path, errors_path
from shardlight.core.schema import Row, SampleError, errors_table, parquet_bytes, rows_table, write_table
from shardlight.models.clip import ClipEmbedder
from shardlight.models.device import pick_batch_size, pick_device, pick_dtype
from shardlight.models.labelers import Labels, build_labeler
from workers.cpus import apply_threads, held_cpus, model_threads
from workers.decode import DecodedBatch, DecodeSpecs, SampleMeta
from workers.decoders import decode_between, make_decoder
from workers.memory import keep_freed_memory
from workers.reader import DecodedSample, RawSample, ShardReader
from workers.reader_process import ReaderProcess
from workers.text import TextPool, text_processes

# Captions embedded together on a CPU: ~8 batches of 64 sort into buckets of nearly one length each. On a GPU
# a window is one batch: there a text batch costs its kernel launches, not its padding.
TEXT_WINDOW = 512


@dataclass
class ImagesDone:
    """One batch with its images embedded and labelled; its captions (as token ids) still to embed."""
    samples: list[SampleMeta]
    image_emb: np.ndarray
    labels: Labels | None
    with_text: list[int]  # positions in `samples` that have a caption
    tokens: torch.Tensor | None  # (len(with_text), context) token ids


class ShardEmbedder:
    """CLIP image/text embeddings and labels for whole shards; load once, call per shard."""

    def __init__(self, clip: ClipSpec, labels: LabelSpec, compute: ComputeSpec):
        self.malloc_kept = keep_freed_memory()  # before the models: their batches reuse pages (workers/memory.py)
        self.device = pick_device(compute.device)
        self.cpus = held_cpus()
        self.threads = model_threads(compute, self.device, self.cpus)
        apply_threads(self.threads)
        self.batch_size = pick_batch_size(self.device, compute.batch_size)
        self.text_window = max(TEXT_WINDOW, self.batch_size) if self.device.type == "cpu" else self.batch_size
        self.clip = ClipEmbedder(clip, self.device)
        params = sum(p.numel() for p in self.clip.model.parameters())
        self.dtype = pick_dtype(self.device, compute.precision, params)
        self.clip.use_dtype(self.dtype)
        self.labeler = build_labeler(labels, self.device, self.dtype, self.clip)
        self.top_k = labels.top_k
        between = decode_between(compute, self.device, self.dtype, params)
        self.decoder = make_decoder(compute, self.device, self._specs(compute), self.cpus, self.batch_size, between)
        processes = text_processes(self.device.type, self.cpus)
        self.text = TextPool(clip.model, processes) if processes else None
        # Where captions are tokenised in helper processes (a GPU worker with CPUs to spare), the shard is
        # read in one too: this process then only feeds the GPU (docs/operations.md, "GPU decoding").
        self.reading = ReaderProcess() if processes else None
        self.decoder.start()  # up before the first shard comes: their start-up is the worker's, not the shard's
        self.warm_up()

    def _specs(self, compute: ComputeSpec) -> DecodeSpecs:
        """uint8 pixel specs where the models' transforms split; their own transforms otherwise."""
        label = None
        if self.labeler is not None and not self.labeler.uses_clip_pixels:
            label = self.labeler.pixel_spec or self.labeler.transform
        return DecodeSpecs(self.clip.pixel_spec or self.clip.preprocess, label, draft=compute.jpeg_draft)

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.batch_size, "dim": self.clip.dim, "cpus": self.cpus,
                "threads": torch.get_num_threads(), "nice": os.nice(0), "text_real_length": self.clip.cuts_text,
                "text_processes": self.text.processes if self.text else 0, "malloc_kept": self.malloc_kept,
                **self.decoder.describe()}

    def close(self) -> None:
        self.decoder.close()
        for helper in (self.text, self.reading):
            if helper:
                helper.close()

    def warm_up(self) -> None:
        """One batch of made-up samples through every part a shard goes through — decode workers, image tower,
        labeler, text tower at several caption lengths, a Parquet table — with nothing written. The first
        calls pick kernels (oneDNN, cuDNN), map the activations' memory and import the writer; done here,
        that is the worker's start-up, which overlaps the driver's, and the first shard runs at the rate of
        the rest."""
        jpeg = io.BytesIO()
        Image.linear_gradient("L").convert("RGB").save(jpeg, format="JPEG")
        image = jpeg.getvalue()
        words = "a photo of a small red square on a plain grey background seen from above in soft light".split()
        samples = [RawSample(key=f"warm-up-{i}", shard="warm-up", image=image, image_format="jpg",
                             caption=" ".join(words[: 1 + i % len(words)]), meta={}, tar_offset=None, tar_size=None)
                   for i in range(self.batch_size)]
        rows, _ = self._embed(samples)
        parquet_bytes(rows_table(rows, self.clip.dim))

    def process(self, shard_url: str, out: str) -> dict:
        """Embed one shard and write its outputs; returns the shard's stats."""
        start = time.perf_counter()
        reader = self.reading.open(shard_url) if self.reading else ShardReader(shard_url)
        fallbacks = self._fallbacks()
        rows, errors = self._embed(reader)
        if reader.problem:
            errors.append(SampleError(None, reader.name, "shard", reader.problem, dropped=False))
        dropped = sum(e.dropped for e in errors)
        stats = {
            "shard": reader.name, "url": shard_url, "samples_read": len(rows) + dropped, "rows": len(rows),
            "errors": dropped, "notes": len(errors) - dropped, "problem": reader.problem,
            "no_caption": sum(r.caption is None for r in rows),
            "decode_fallbacks": self._fallbacks() - fallbacks,
            "seconds": round(time.perf_counter() - start, 3),
        }
        stats["images_per_s"] = round(len(rows) / max(stats["seconds"], 1e-9), 2)
        write_table(errors_path(out, reader.name), errors_table(errors))
        table = rows_table(rows, self.clip.dim)
        write_table(embeddings_path(out, reader.name), table, {STATS_KEY: json.dumps(stats).encode()})
        return stats

    def _embed(self, samples: Iterable[RawSample | SampleError]) -> tuple[list[Row], list[SampleError]]:
        """Rows for the samples that decode, in order, and the error records of the rest."""
        errors: list[SampleError] = []
        rows: list[Row] = []
        batches = self.decoder.batches(samples)
        with_tokens = self.text.ahead(batches, _captions) if self.text else ((b, None) for b in batches)
        waiting: list[ImagesDone] = []
        for batch, tokens in with_tokens:
            errors.extend(batch.errors)
            if batch.samples:
                waiting.append(self._embed_images(batch, tokens))
                if sum(len(w.with_text) for w in waiting) >= self.text_window:
                    rows.extend(self._finish(waiting))
                    waiting = []
        rows.extend(self._finish(waiting))
        return rows, errors

    def _fallbacks(self) -> int:
        """Images the GPU decoder handed to the CPU so far (0 for the CPU decoder)."""
        return getattr(self.decoder, "stats", {}).get("fallbacks", 0)

    def _prepare(self, sample: DecodedSample) -> tuple:
        """One decoded image through the models' own PIL transforms (float tensors): for benchmarks that
        time the models alone."""
        clip_px = self.clip.preprocess(sample.image)
        label_px = None
        if self.labeler is not None and not self.labeler.uses_clip_pixels:
            label_px = self.labeler.transform(sample.image)
        return sample, clip_px, label_px

    def _embed_images(self, batch: DecodedBatch, tokens=None) -> ImagesDone:
        """Embed and label one batch's images and tokenise its captions (unless the TextPool already did)."""
        image_emb = self.clip.embed_images(batch.clip)
        labels = self.labeler(batch.label, image_emb) if self.labeler is not None else None
        captions = [s.raw.caption for s in batch.samples]
        with_text = [i for i, c in enumerate(captions) if c is not None]
        if with_text and tokens is None:
            tokens = self.clip.tokenizer([captions[i] for i in with_text])
        tokens = torch.as_tensor(tokens, dtype=torch.long) if with_text else None
        return ImagesDone(batch.samples, image_emb, labels, with_text, tokens)

    def _finish(self, waiting: list[ImagesDone]) -> list[Row]:
        """Embed the captions of `waiting` together (sorted by length inside `embed_tokens`) and build their
        rows in batch order."""
        with_tokens = [w.tokens for w in waiting if w.tokens is not None]
        text_all = self.clip.embed_tokens(torch.cat(with_tokens)) if with_tokens else None
        rows, done = [], 0
        for w in waiting:
            text_emb = np.zeros_like(w.image_emb)
            if w.with_text:
                text_emb[w.with_text] = text_all[done: done + len(w.with_text)]
                done += len(w.with_text)
            scores = (w.image_emb * text_emb).sum(axis=1)
            for i, s in enumerate(w.samples):
                raw = s.raw
                rows.append(Row(
                    key=raw.key, shard=raw.shard, caption=raw.caption,
                    url=raw.meta.get("url") if isinstance(raw.meta.get("url"), str) else None,
                    width=s.width, height=s.height, image_format=raw.image_format,
                    tar_offset=raw.tar_offset, tar_size=raw.tar_size, image_embedding=w.image_emb[i],
                    text_embedding=text_emb[i] if raw.caption is not None else None,
                    clip_score=float(scores[i]) if raw.caption is not None else None,
                    meta=raw.meta, **(w.labels.row(i) if w.labels else {})))
        return rows


def _captions(batch: DecodedBatch) -> list[str]:
    return [m.raw.caption for m in batch.samples if m.raw.caption is not None]
