"""Search the index by text, image, vector or an existing key, returning rows with their metadata.

    >>> from index.search import Searcher
    >>> Searcher("out").search(text="a red circle", k=5, label="red circle", synthetic=False)

Filters are applied inside FAISS (an id selector), so a rare label still gets its k best matches
among the vectors the index visits, instead of whatever survives from an unfiltered top-k.
"""

from __future__ import annotations

import difflib
import io
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from index.store import load_index
from shardlight.core.config import ClipSpec
from shardlight.core.errors import IndexStateError, InputError, first_line
from shardlight.core.space import recorded_clip
from shardlight.core.storage import join, open_read

RESULT_COLUMNS = ["key", "caption", "label", "label_prob", "url", "clip_score"]


class KeyNotFound(InputError):
    """A key that is not in the index (HTTP 404)."""


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
    synthetic: bool = False  # a generated (augmented) image rather than an input sample
    id: int = -1  # FAISS id, stable for one build of the index

    def to_dict(self) -> dict:
        return asdict(self)


class KeyView:
    """Read-only sequence over an Arrow string column: no Python string per row until one is asked for."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return self.column.to_pylist()[i] if i.step not in (None, 1) else self.column[i].to_pylist()
        return self.column[i].as_py()


def _columns_of(shard_url: str) -> list[str]:
    with open_read(shard_url) as f:
        return pq.ParquetFile(f).schema_arrow.names


class Searcher:
    """Loads OUT's index once; embeds queries with the CLIP model that built it (index/meta.json; else
    OUT/models.json or run.json for an index built without one), never with a later run's config."""

    def __init__(self, out: str | Path, device: str = "cpu"):
        self.out = str(out)
        self.index, ids, self.meta = load_index(self.out, mmap=True)  # IVF lists and float16 rows stay on disk
        self.rows = ids.column("row").to_numpy()
        # kept in Arrow, not as Python strings: a fraction of the memory at scale (docs/scale.md)
        self._keys, self._shards = ids.column("key"), ids.column("shard")
        sources = ids.column("source") if "source" in ids.column_names else pa.array(["embeddings"] * ids.num_rows)
        parts = pc.dictionary_encode(pc.binary_join_element_wise(sources, ids.column("shard"), "/"))
        if isinstance(parts, pa.ChunkedArray):
            parts = parts.combine_chunks()
        self.parts: list[str] = parts.dictionary.to_pylist()  # "embeddings/00000": one Parquet file each
        self.part_of = parts.indices.to_numpy()  # FAISS id → index into self.parts
        self._id_of_key: dict[str, int] | None = None
        self._device = device
        self._clip = None
        self._lock = threading.Lock()  # one CLIP forward pass at a time; FAISS searches run concurrently
        self._filters: dict | None = None
        self._reconstructs = False
        self._shard_columns = lru_cache(maxsize=64)(self._read_shard_columns)

    @property
    def keys(self) -> KeyView:
        """The key of each FAISS id (`keys[i]`, `keys[a:b]`), read from the Arrow column on demand."""
        return KeyView(self._keys)

    @property
    def shards(self) -> KeyView:
        """The shard of each FAISS id, likewise."""
        return KeyView(self._shards)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def clip(self):
        """The CLIP embedder, built on first text or image query."""
        with self._lock:
            if self._clip is None:
                import torch

                from shardlight.models.clip import ClipEmbedder

                spec = self.meta.get("model") or recorded_clip(self.out)
                if not spec:
                    raise IndexStateError(f"neither {self.out}/index/meta.json nor {self.out}/models.json names "
                                          "the CLIP model that embedded this index")
                spec = ClipSpec(**spec)
                self._clip = ClipEmbedder(spec, torch.device(self._device))
            return self._clip

    def embed_text(self, text: str) -> np.ndarray:
        clip = self.clip
        with self._lock:
            return clip.embed_texts([text])[0]

    def embed_image(self, image: bytes | str | Path | Image.Image) -> np.ndarray:
        import torch

        if not isinstance(image, Image.Image):
            image = _open_image(image)
        clip = self.clip
        pixels = clip.preprocess(image.convert("RGB"))
        with self._lock:
            return clip.embed_images(torch.stack([pixels]))[0]

    def id_of_key(self, key: str) -> int:
        if self._id_of_key is None:
            self._id_of_key = {k: i for i, k in enumerate(self._keys.to_pylist())}
        if key not in self._id_of_key:
            raise KeyNotFound(f"no sample with key {key!r} in the index")
        return self._id_of_key[key]

    def vector_of_key(self, key: str) -> np.ndarray:
        i = self.id_of_key(key)
        with open_read(self.part_url(int(self.part_of[i]))) as f:
            table = pq.read_table(f, columns=["image_embedding"])
        return np.asarray(table.column("image_embedding")[int(self.rows[i])].as_py(), np.float32)

    def vector_of_id(self, i: int) -> np.ndarray:
        """The stored vector of FAISS id `i` (as the index keeps it: exact unless compressed)."""
        if not self._reconstructs:
            with self._lock:
                _enable_reconstruct(self.index)
                self._reconstructs = True
        return self.index.reconstruct(int(i))

    def query_vector(self, text: str | None = None, image=None, vector=None, key: str | None = None) -> np.ndarray:
        """The unit query vector for exactly one of text, image, vector or key."""
        given = [name for name, v in (("text", text), ("image", image), ("vector", vector), ("key", key))
                 if v is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of text, image, vector or key (got {', '.join(given) or 'none'})")
        if text is not None:
            return self.embed_text(text)
        if image is not None:
            return self.embed_image(image)
        if key is not None:
            return self.vector_of_key(key)
        query = np.asarray(vector, np.float32).reshape(-1)
        if query.shape[0] != self.meta["dim"]:
            raise InputError(f"query vector has {query.shape[0]} dimensions, the index has {self.meta['dim']}")
        if not np.all(np.isfinite(query)):
            raise InputError("query vector has non-finite values")
        return query / max(float(np.linalg.norm(query)), 1e-12)

    def search(self, text: str | None = None, image=None, vector=None, key: str | None = None, k: int = 10,
               label: str | None = None, synthetic: bool | None = None) -> list[Hit]:
        """Nearest samples to exactly one of text, image, vector or key.

        Args:
            k: number of results.
            label: keep only rows with this label.
            synthetic: True keeps only generated rows, False only input rows, None both.
        """
        query = self.query_vector(text=text, image=image, vector=vector, key=key)
        scores, ids = self.neighbors(query, k, label=label, synthetic=synthetic)
        return self.hits(ids, scores)

    def neighbors(self, query: np.ndarray, k: int, label: str | None = None,
                  synthetic: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest rows passing the filters, best first.

        A selective filter can leave fewer than k matches among the lists (IVF) or graph nodes (HNSW)
        a search visits; the search then widens (×4 nprobe / efSearch) until it has k or saw everything.
        """
        if k < 1:
            raise InputError("k must be at least 1")
        x = query.reshape(1, -1).astype(np.float32)
        if label is None and synthetic is None:
            scores, ids = self.index.search(x, min(k, self.size))
        else:
            mask = self._filter_mask(label, synthetic)
            want = min(k, int(mask.sum()))
            if want == 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            params = _FilteredSearch(self.index, mask)
            while True:
                scores, ids = self.index.search(x, want, params=params.params)
                if (ids[0] >= 0).sum() >= want or not params.widen():
                    break
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def hits(self, ids, scores) -> list[Hit]:
        return [self._hit(int(i), float(s)) for i, s in zip(ids, scores)]

    def _filter_mask(self, label: str | None, synthetic: bool | None) -> np.ndarray:
        cols = self._filter_columns()
        mask = np.ones(self.size, bool)
        if label is not None:
            if label not in cols["label_names"]:
                raise InputError(_unknown_label(label, list(cols["label_names"])))
            mask &= cols["label_codes"] == cols["label_names"][label]
        if synthetic is not None:
            mask &= cols["synthetic"] == bool(synthetic)
        return mask

    def _filter_columns(self) -> dict:
        """Label and synthetic flag of every FAISS id, read once (label as dictionary codes)."""
        if self._filters is None:
            labels = np.full(self.size, -1, np.int32)
            synthetic = np.zeros(self.size, bool)
            names: dict[str, int] = {}
            for part in range(len(self.parts)):
                ids = np.flatnonzero(self.part_of == part)
                url = self.part_url(part)
                wanted = ["label"] + (["synthetic"] if "synthetic" in _columns_of(url) else [])
                with open_read(url) as f:
                    table = pq.read_table(f, columns=wanted).take(pa.array(self.rows[ids]))
                for value, where in _group(table.column("label").to_pylist()):
                    if value is not None:
                        labels[ids[where]] = names.setdefault(value, len(names))
                if "synthetic" in wanted:
                    synthetic[ids] = table.column("synthetic").fill_null(False).to_numpy(zero_copy_only=False)
            self._filters = {"label_codes": labels, "label_names": names, "synthetic": synthetic}
        return self._filters

    def labels(self) -> list[str]:
        return sorted(self._filter_columns()["label_names"])

    def part_url(self, part: int) -> str:
        """The Parquet file of one part: OUT/<source>/<shard>.parquet."""
        source, shard = self.parts[part].split("/", 1)
        return join(self.out, source, f"{shard}.parquet")

    def _read_shard_columns(self, part: int) -> dict[str, list]:
        url = self.part_url(part)
        wanted = RESULT_COLUMNS + (["synthetic"] if "synthetic" in _columns_of(url) else [])
        with open_read(url) as f:
            table = pq.read_table(f, columns=wanted)
        return {c: table.column(c).to_pylist() for c in wanted}

    def _hit(self, i: int, score: float) -> Hit:
        shard, row = self._shards[i].as_py(), int(self.rows[i])
        cols = self._shard_columns(int(self.part_of[i]))
        synthetic = bool(cols["synthetic"][row]) if "synthetic" in cols else False
        return Hit(key=cols["key"][row], score=score, caption=cols["caption"][row], label=cols["label"][row],
                   label_prob=cols["label_prob"][row], url=cols["url"][row], clip_score=cols["clip_score"][row],
                   shard=shard, row=row, synthetic=synthetic, id=i)


def _open_image(source: bytes | str | Path) -> Image.Image:
    """A query image from a file or bytes; a missing file, a folder or undecodable bytes is one line naming it."""
    name = "the query image"
    if isinstance(source, (str, Path)):
        path, name = Path(source), f"query image {source}"
        if not path.exists():
            raise InputError(f"{name} not found")
        if path.is_dir():
            raise InputError(f"{name} is a folder, not an image file")
        source = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(source))
        image.load()
    except Exception as err:
        reason = first_line(err, with_type=False)
        if "cannot identify image file" in reason:
            reason = "not an image format Pillow can read (JPEG, PNG, WebP, …)"
        raise InputError(f"cannot decode {name}: {reason}") from None
    return image


def _unknown_label(label: str, known: list[str]) -> str:
    """One line naming the labels closest to a label no row has."""
    close = difflib.get_close_matches(label, known, n=3, cutoff=0.4) or sorted(known)[:3]
    suggestion = f"; closest: {', '.join(repr(c) for c in close)}" if close else "; the index has no labels"
    return f"no indexed row has the label {label!r}{suggestion} ({len(known)} labels in all)"


def _enable_reconstruct(index: faiss.Index) -> None:
    """IVF indexes reconstruct by id only with a direct map (8 bytes per vector); a re-ranking index
    reconstructs from the float vectors it keeps."""
    if isinstance(index, faiss.IndexRefine):
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    if ivf.direct_map.no():
        ivf.make_direct_map()


def _group(values: list) -> list[tuple[object, np.ndarray]]:
    """(value, positions) for each distinct value."""
    arr = pa.array(values)
    encoded = pc.dictionary_encode(arr)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return [(v, np.flatnonzero(codes == c)) for c, v in enumerate(encoded.dictionary.to_pylist())]


class _FilteredSearch:
    """FAISS search parameters restricted to `mask`, keeping (and able to widen) nprobe/efSearch."""

    def __init__(self, index: faiss.Index, mask: np.ndarray):
        self.bits = np.packbits(mask, bitorder="little")  # the selector reads this buffer: keep it alive
        self.selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(self.bits))
        self.size = len(mask)
        refine = index if isinstance(index, faiss.IndexRefine) else None  # `…,RFlat`: the filter goes to its base
        base = faiss.downcast_index(refine.base_index) if refine is not None else index
        inner = faiss.downcast_index(base.index) if isinstance(base, faiss.IndexPreTransform) else base
        self.ivf = inner if isinstance(inner, faiss.IndexIVF) else None
        if self.ivf is not None:
            self.inner = faiss.SearchParametersIVF(sel=self.selector, nprobe=self.ivf.nprobe)
        elif isinstance(inner, faiss.IndexHNSW):
            self.inner = faiss.SearchParametersHNSW(sel=self.selector, efSearch=inner.hnsw.efSearch)
        else:
            self.inner = faiss.SearchParameters(sel=self.selector)
        self.params = self.inner
        if inner is not base:
            self.params = faiss.SearchParametersPreTransform(index_params=self.inner)
        if refine is not None:
            self.base_params = self.params  # the refine parameters point at it: keep it alive
            self.params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=self.params)

    def widen(self) -> bool:
        """Search more lists / graph nodes; False when the search already covers everything."""
        if isinstance(self.inner, faiss.SearchParametersIVF) and self.inner.nprobe < self.ivf.nlist:
            self.inner.nprobe = min(self.ivf.nlist, self.inner.nprobe * 4)
            return True
        if isinstance(self.inner, faiss.SearchParametersHNSW) and self.inner.efSearch < self.size:
            self.inner.efSearch = min(self.size, self.inner.efSearch * 4)
            return True
        return False
