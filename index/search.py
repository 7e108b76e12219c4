"""Search the index by text, image, vector or an existing key, returning rows with their metadata.

    >>> from index.search import Searcher
    >>> Searcher("out").search(text="a red circle", k=5)
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from index.build import load_index
from workers.config import ClipSpec
from workers.schema import embeddings_path, run_record_path
from workers.errors import IndexStateError, InputError
from workers.storage import exists, open_read, read_bytes

RESULT_COLUMNS = ["key", "caption", "label", "label_prob", "url", "clip_score"]


@dataclass
class Hit:
    key: str
    score: float
    caption: str | None
    label: str | None
    label_prob: float | None
    url: str | None
    clip_score: float | None
    shard: str
    row: int

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """Loads OUT's index once; embeds queries with the CLIP model recorded in OUT/run.json."""

    def __init__(self, out: str | Path, device: str = "cpu"):
        self.out = str(out)
        self.index, ids, self.meta = load_index(self.out)
        self.shards = ids.column("shard").to_pylist()
        self.rows = ids.column("row").to_numpy()
        self.keys = ids.column("key").to_pylist()
        self._id_of_key: dict[str, int] | None = None
        self._device = device
        self._clip = None
        self._shard_columns = lru_cache(maxsize=64)(self._read_shard_columns)

    @property
    def clip(self):
        """The CLIP embedder, built on first text or image query."""
        if self._clip is None:
            import torch

            from workers.models import ClipEmbedder

            record = run_record_path(self.out)
            if not exists(record):
                raise IndexStateError(f"{record} is missing: cannot tell which CLIP model embedded this index")
            spec = ClipSpec(**json.loads(read_bytes(record))["config"]["clip"])
            self._clip = ClipEmbedder(spec, torch.device(self._device))
        return self._clip

    def embed_text(self, text: str) -> np.ndarray:
        return self.clip.embed_texts([text])[0]

    def embed_image(self, image: bytes | str | Path | Image.Image) -> np.ndarray:
        import torch

        if not isinstance(image, Image.Image):
            data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except Exception as err:
                raise InputError(f"cannot decode query image: {err}") from None
        pixels = self.clip.preprocess(image.convert("RGB"))
        return self.clip.embed_images(torch.stack([pixels]))[0]

    def vector_of_key(self, key: str) -> np.ndarray:
        if self._id_of_key is None:
            self._id_of_key = {k: i for i, k in enumerate(self.keys)}
        if key not in self._id_of_key:
            raise InputError(f"no sample with key {key!r} in the index")
        i = self._id_of_key[key]
        with open_read(embeddings_path(self.out, self.shards[i])) as f:
            table = pq.read_table(f, columns=["image_embedding"])
        return np.asarray(table.column("image_embedding")[int(self.rows[i])].as_py(), np.float32)

    def search(self, text: str | None = None, image=None, vector=None, key: str | None = None, k: int = 10,
               label: str | None = None) -> list[Hit]:
        """Nearest samples to exactly one of text, image, vector or key; `label` keeps only that label."""
        given = [name for name, v in (("text", text), ("image", image), ("vector", vector), ("key", key))
                 if v is not None]
        if len(given) != 1:
            raise InputError("give exactly one of text, image, vector or key")
        if text is not None:
            query = self.embed_text(text)
        elif image is not None:
            query = self.embed_image(image)
        elif key is not None:
            query = self.vector_of_key(key)
        else:
            query = np.asarray(vector, np.float32).reshape(-1)
            if query.shape[0] != self.meta["dim"]:
                raise InputError(f"query vector has {query.shape[0]} dimensions, the index has {self.meta['dim']}")
            query = query / max(np.linalg.norm(query), 1e-12)
        fetch = min(self.index.ntotal, k if label is None else max(k * 10, 100))
        scores, ids = self.index.search(query.reshape(1, -1).astype(np.float32), fetch)
        hits = [self._hit(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if label is not None:
            hits = [h for h in hits if h.label == label]
        return hits[:k]

    def _read_shard_columns(self, shard: str) -> dict[str, list]:
        with open_read(embeddings_path(self.out, shard)) as f:
            table = pq.read_table(f, columns=RESULT_COLUMNS)
        return {c: table.column(c).to_pylist() for c in RESULT_COLUMNS}

    def _hit(self, i: int, score: float) -> Hit:
        shard, row = self.shards[i], int(self.rows[i])
        cols = self._shard_columns(shard)
        return Hit(key=cols["key"][row], score=score, caption=cols["caption"][row], label=cols["label"][row],
                   label_prob=cols["label_prob"][row], url=cols["url"][row], clip_score=cols["clip_score"][row],
                   shard=shard, row=row)
