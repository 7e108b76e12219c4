"""The per-shard augmentation worker: DiT images per class (`generate`) and of source images (`vary`).

`ShardAugmenter` has the same contract as `ShardEmbedder` (`describe()`, `process(shard_url, out)`); the flow
runs it inside `workers.shard_worker.ShardWorker`, after the embedder, sharing its models. It reads the
shard's finished embeddings file (ViT labels per key) and the source shard's images, generates
deterministically from seeds derived from (source key or class, index), embeds every image with CLIP, scores
it against its class prompt, drops and counts those under `min_clip_score`, and labels the rest with the ViT.
Outputs: OUT/augmented_images/<shard>.tar (WebDataset: KEY.png + KEY.json) and OUT/augmented/<shard>.parquet, written
last as the shard's done marker.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image

from shardlight.core.config import AugmentSpec, ClipSpec, ComputeSpec, LabelSpec
from shardlight.core.layout import STATS_KEY, augmented_path, embeddings_path
from shardlight.core.schema import Generation, Row, SampleError, rows_table, write_table
from shardlight.core.storage import exists, open_read, shard_name, write_atomic
from shardlight.models.clip import ClipEmbedder
from shardlight.models.device import pick_device, pick_dtype
from shardlight.models.labelers import build_labeler
from shardlight.models.sampler import DiTGenerator
from workers.reader import ShardReader, decode


def derive_seed(base: int, mode: str, ident: str, index: int) -> int:
    """A 63-bit seed from (run seed, mode, source key or shard/class, index): stable across runs and machines.

    `generate` identifies a class within its shard ("00003/red circle"), so every shard adds new images
    rather than the same ones again.
    """
    digest = hashlib.sha256(f"{base}|{mode}|{ident}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass
class Job:
    """One image to make."""

    key: str
    mode: str  # generate | vary
    target: int  # DiT class id it is conditioned on
    seed: int
    source_key: str | None = None
    source: Image.Image | None = None


class ShardAugmenter:
    """DiT augmentations of whole shards; load once, call per shard."""

    def __init__(self, augment: AugmentSpec, clip: ClipSpec, labels: LabelSpec, compute: ComputeSpec,
                 models: tuple | None = None):
        """`models`: an already loaded (ClipEmbedder, labeler) built from the same specs, to share rather than
        load again (`workers.shard_worker.ShardWorker` passes its embedder's)."""
        self.spec = augment
        self.device = pick_device(compute.device)
        self.dtype = pick_dtype(self.device, compute.precision)
        self.gen = DiTGenerator(augment.checkpoint, augment.model, augment.vae, self.device, self.dtype)
        if models is None:
            embedder = ClipEmbedder(clip, self.device, self.dtype)
            models = (embedder, build_labeler(labels, self.device, self.dtype, embedder))
        self.clip, self.labeler = models
        self.top_k = labels.top_k
        self.steps = augment.steps or self.gen.default_steps
        self.guidance = self.gen.default_guidance if augment.guidance is None else augment.guidance
        self.prompts = [augment.prompt.format(name) for name in self.gen.class_names]
        self.prompt_embeddings = self.clip.embed_texts(self.prompts)
        self.class_ids = {name: i for i, name in enumerate(self.gen.class_names)}

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.spec.batch_size, "model": self.gen.name, "classes": len(self.gen.class_names),
                "steps": self.steps, "guidance": self.guidance, "dim": self.clip.dim}

    def process(self, shard_url: str, out: str) -> dict:
        """Augment one shard and write its tar and Parquet; returns the shard's stats."""
        start, name = time.perf_counter(), shard_name(shard_url)
        source = embeddings_path(out, name)
        if not exists(source):
            raise FileNotFoundError(f"{source} missing: the augment stage runs on embedded shards")
        with open_read(source) as f:
            parquet = pq.ParquetFile(f)
            source_schema = parquet.schema_arrow  # its json columns, which the generated rows carry too (null)
            rows = parquet.read(columns=["key", "label"]).to_pylist()
        jobs, unknown = self._plan(shard_url, rows)
        images = self._run(jobs)
        rows, tar_bytes, dropped = self._score_and_pack(name, jobs, images)
        stats = {
            "shard": name, "url": shard_url, "model": self.gen.name, "generated": len(jobs), "rows": len(rows),
            "dropped_low_clip": dropped, "unknown_labels": unknown,
            "by_mode": dict(Counter(r.generation.mode for r in rows)),
            "label_agrees": sum(r.generation.target_label == r.label for r in rows),
            "seconds": round(time.perf_counter() - start, 3),
        }
        stats["images_per_s"] = round(len(jobs) / max(stats["seconds"], 1e-9), 2)
        write_atomic(augmented_path(out, name, "tar"), tar_bytes)
        table = rows_table(rows, self.clip.dim, like=source_schema)
        write_table(augmented_path(out, name, "parquet"), table, {STATS_KEY: json.dumps(stats).encode()})
        return stats

    def _plan(self, shard_url: str, rows: list[dict]) -> tuple[list[Job], int]:
        """The images to make, in a fixed order; labels the DiT does not know are counted and skipped."""
        spec, name = self.spec, shard_name(shard_url)
        known = [r for r in rows if r["label"] in self.class_ids]
        jobs: list[Job] = []
        if "generate" in spec.modes:
            classes = spec.classes if spec.classes is not None else sorted({r["label"] for r in known})
            for cls in classes:
                if cls not in self.class_ids:
                    raise ValueError(f"augment.classes: {cls!r} is not a class of the DiT")
                for i in range(spec.generate_per_class):
                    jobs.append(Job(f"{name}_gen_{self.class_ids[cls]:04d}_{i:03d}", "generate",
                                    self.class_ids[cls], derive_seed(spec.seed, "generate", f"{name}/{cls}", i)))
        if "vary" in spec.modes and spec.vary_sources and spec.vary_per_source:
            sources = {r["key"]: r["label"] for r in known[: spec.vary_sources]}
            for key, image in self._source_images(shard_url, sources):
                for j in range(spec.vary_per_source):
                    jobs.append(Job(f"{key}_vary_{j:03d}", "vary", self.class_ids[sources[key]],
                                    derive_seed(spec.seed, "vary", key, j), source_key=key, source=image))
        return jobs, len(rows) - len(known)

    @staticmethod
    def _source_images(shard_url: str, wanted: dict[str, str]) -> list[tuple[str, Image.Image]]:
        """Decoded images of the wanted keys, in shard order (unreadable ones are skipped)."""
        found = []
        for raw in ShardReader(shard_url):
            if isinstance(raw, SampleError) or raw.key not in wanted:
                continue
            decoded = decode(raw)
            if not isinstance(decoded, SampleError):
                found.append((raw.key, decoded.image))
            if len(found) == len(wanted):
                break
        return found

    def _run(self, jobs: list[Job]) -> list[Image.Image]:
        """Denoise in batches of one mode; every image depends only on its own seed."""
        made: dict[str, Image.Image] = {}
        spec = self.spec
        for mode in ("generate", "vary"):
            part = [j for j in jobs if j.mode == mode]
            for i in range(0, len(part), spec.batch_size):
                batch = part[i:i + spec.batch_size]
                labels, seeds = [j.target for j in batch], [j.seed for j in batch]
                if mode == "generate":
                    images = self.gen.generate(labels, seeds, self.steps, self.guidance)
                else:
                    images = self.gen.vary([j.source for j in batch], labels, seeds, spec.strength,
                                           self.steps, self.guidance)
                made.update(zip((j.key for j in batch), images))
        return [made[j.key] for j in jobs]

    def _score_and_pack(self, shard: str, jobs: list[Job], images: list[Image.Image]) -> tuple[list[Row], bytes, int]:
        """CLIP score vs class prompt, drop low scores, ViT labels, then the tar and the Parquet rows."""
        rows: list[Row] = []
        if not jobs:
            return rows, _tar([]), 0
        emb = self.clip.embed_images(torch.stack([self.clip.preprocess(im) for im in images]))
        scores = (emb * self.prompt_embeddings[[j.target for j in jobs]]).sum(axis=1)
        keep = [i for i in range(len(jobs)) if self.spec.min_clip_score is None
                or scores[i] >= self.spec.min_clip_score]
        labels = None
        if self.labeler is not None and keep:
            pixels = None if self.labeler.uses_clip_pixels else \
                torch.stack([self.labeler.transform(images[i]) for i in keep])
            labels = self.labeler(pixels, emb[keep])
        members = []
        for n, i in enumerate(keep):
            job, image = jobs[i], images[i]
            made = self._generation(job)
            members.append((job.key, _png(image), _tar_json(made, float(scores[i]))))
            rows.append(Row(
                key=job.key, shard=shard, caption=self.prompts[job.target],  # the class prompt stands in for a caption
                url=None, width=image.width, height=image.height, image_format="png", image_embedding=emb[i],
                text_embedding=self.prompt_embeddings[job.target], clip_score=float(scores[i]), generation=made,
                **(labels.row(n) if labels else {})))
        tar_bytes = _tar(members)
        offsets = _png_offsets(tar_bytes)
        for row in rows:
            row.tar_offset, row.tar_size = offsets[row.key]
        return rows, tar_bytes, len(jobs) - len(keep)

    def _generation(self, job: Job) -> Generation:
        return Generation(mode=job.mode, target_label=self.gen.class_names[job.target], seed=job.seed,
                          steps=self.steps, guidance=self.guidance, generator=self.gen.name, source_key=job.source_key,
                          strength=self.spec.strength if job.mode == "vary" else None)


def _tar_json(made: Generation, score: float) -> dict:
    """The image's json member in the tar: how it was made (as its Parquet row's generation columns say)."""
    return {"synthetic": True, "source_key": made.source_key, "target_label": made.target_label, "mode": made.mode,
            "seed": made.seed, "steps": made.steps, "guidance": made.guidance, "strength": made.strength,
            "model": made.generator, "prompt_score": round(score, 6)}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes, dict]]) -> bytes:
    """A WebDataset shard in memory (KEY.png + KEY.json), written atomically by the caller."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as sink:  # fixed mtime: a re-run writes the same bytes
        for key, png, meta in members:
            sink.write({"__key__": key, "png": png, "json": json.dumps(meta).encode()})
    return buf.getvalue()


def _png_offsets(tar_bytes: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name[: -len(".png")]: (m.offset_data, m.size) for m in tar if m.name.endswith(".png")}
