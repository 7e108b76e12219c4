"""Captions → token ids in helper processes, a few batches ahead of a GPU worker's model thread.

open_clip's tokenizer (ftfy, a regex and BPE, in Python) costs ~50-100 µs per caption: at a GPU's 10,000
images/s that is a whole core inside the process that also reads the shard and feeds the GPU, and Python
runs one thread at a time. `TextPool` tokenises each batch's captions in spawned helper processes (each
builds the tokenizer once, by model name, exactly as `ClipEmbedder` does), split across them, and hands
the ids back in batch order through `ahead()`. CPU workers keep tokenising inline: their model is two
orders of magnitude slower than their tokenizer.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

_TOKENIZER = None


def _init(model_name: str) -> None:
    global _TOKENIZER
    import open_clip

    from shardlight.models.weights import register_repo_models

    register_repo_models()
    _TOKENIZER = open_clip.get_tokenizer(model_name)


def _tokenise(captions: list[str]) -> np.ndarray:
    return _TOKENIZER(captions).numpy()


def text_processes(device_type: str, cpus: int) -> int:
    """Helper processes for a worker: none on a CPU worker or with fewer than 4 CPUs (the model thread,
    the reading thread and the GPU decode thread come first), else up to 4 (each ~10,000+ captions/s)."""
    if device_type != "cuda" or cpus < 4:
        return 0
    return min(4, cpus - 3)


class TextPool:
    """Tokenise batches of captions in `processes` helper processes; `ahead` pairs items with their ids."""

    def __init__(self, model_name: str, processes: int, chunk: int = 128):
        self.model_name, self.processes, self.chunk = model_name, processes, chunk
        self._pool: cf.ProcessPoolExecutor | None = None

    def submit(self, captions: list[str]) -> list[cf.Future]:
        if self._pool is None:
            # spawn, not fork: the parent holds a CUDA context and runs threads
            self._pool = cf.ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init, initargs=(self.model_name,))
        return [self._pool.submit(_tokenise, captions[i:i + self.chunk]) for i in range(0, len(captions), self.chunk)]

    def ahead(self, items: Iterable, captions: Callable[[object], list[str]], depth: int = 2) -> Iterator[tuple]:
        """(item, token ids (n, context) or None when it has no captions), tokenised `depth` items ahead."""
        pending: deque = deque()
        for item in items:
            texts = captions(item)
            pending.append((item, self.submit(texts) if texts else []))
            if len(pending) > depth:
                yield self._ready(*pending.popleft())
        while pending:
            yield self._ready(*pending.popleft())

    @staticmethod
    def _ready(item, futures: list[cf.Future]) -> tuple:
        return item, (np.concatenate([f.result() for f in futures]) if futures else None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
