"""Decoders: a shard's samples → fixed-size batches of model pixels, in shard order, with the errors between.

`CpuDecoder` reads a shard's samples, cuts them into chunks, hands the chunks to N decode workers (processes by
default, threads, or inline when N is 0) and reassembles the results in shard order into batches of exactly
`batch_size` samples (the last one shorter). Two schedules: `beside` (a conductor thread decodes up to
`prefetch` batches ahead, beside the model) and `between` (a batch is decoded, by all N at once, when the
model asks for it, so decoding and the model take turns on cores they share; docs/benchmarks.md). Invariants:
- order: rows come out in shard order whatever the number of workers; every input item is either a
  sample in a batch or an error record in `errors`, in shard order (so rows + dropped == samples read);
- a decode process that dies (OOM, a signal) costs nothing: the pool is restarted and every chunk not yet
  collected is decoded again; only a shard that kills it `max_restarts` times fails, with one clear error;
  a death can never hang the pool, since a decode process replies with a file's path, not its pixels
  (workers/decode_job.py: a short reply is one atomic pipe write);
- a consumer that stops early (a model error) stops the decoding too; no thread or queue outlives it.
`Decoder` is the contract the GPU decoder (`workers/gpu_decode.py`) keeps too: `start` (helpers up before the
first shard), `batches` (the invariants above), `describe` (for the run's `worker` record), `close`.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from shardlight.core.errors import ClusterError, InputError
from shardlight.core.processes import alive
from shardlight.core.schema import SampleError
from workers.decode_job import (
    DecodeSpecs,
    decode_chunk,
    decode_chunk_to_file,
    decode_one,
    init_worker,
    read_chunk_file,
)
from workers.reader import RawSample

__all__ = ["CpuDecoder", "DecodeSpecs", "DecodedBatch", "Decoder", "SampleMeta"]


@dataclass
class SampleMeta:
    raw: RawSample
    width: int  # the image file's own size (before any reduced-scale decode)
    height: int


@dataclass
class DecodedBatch:
    samples: list[SampleMeta]
    clip: torch.Tensor  # (N, 3, S, S) uint8, or float when the model's transform has no PixelSpec
    label: torch.Tensor | None
    errors: list[SampleError] = field(default_factory=list)  # items since the previous batch, in order


class Decoder(Protocol):
    def start(self) -> None: ...

    def batches(self, samples: Iterable[RawSample | SampleError]) -> Iterator[DecodedBatch]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class _Stopped(Exception):
    """The consumer went away; the producer unwinds quietly."""


_END = object()
# How long `start` waits for its processes; one that is not up by then (or died) is the first shard's to
# meet, where a broken pool is restarted as it is mid-shard.
START_TIMEOUT_S = 60.0


def produced_ahead(produce: Callable[[Callable[[object], None]], None], depth: int, name: str) -> Iterator:
    """What `produce(put)` puts, made on a thread of its own up to `depth` items ahead of the consumer.

    An exception in `produce` is raised here, in the consumer, after the items put before it; a consumer that
    stops early (closes the iterator, or raises) makes the next `put` unwind `produce`, and the thread is
    joined before this returns, so no thread or queue outlives the iteration."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def run() -> None:
        try:
            produce(put)
            put(_END)
        except _Stopped:
            pass
        except BaseException as err:  # re-raised on the consuming thread
            try:
                put(err)
            except _Stopped:
                pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def chunks(samples: Iterable, images: int) -> Iterator[list]:
    """Runs of `images` images, each with the error records read between them, in the shard's order."""
    chunk, count = [], 0
    for item in samples:
        chunk.append(item)
        count += isinstance(item, RawSample)
        if count == images:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


class _Assembler:
    """Turns chunk results back into fixed-size batches, in order, carrying the errors in between."""

    def __init__(self, batch_size: int, pin_memory: bool, put):
        self.batch_size, self.pin_memory, self.put = batch_size, pin_memory, put
        self.metas: list[SampleMeta] = []
        self.clip: list = []
        self.label: list = []
        self.errors: list[SampleError] = []

    def add(self, chunk: list, results: list) -> None:
        done = iter(results)
        for item in chunk:
            if isinstance(item, SampleError):
                self.errors.append(item)
                continue
            if item.metadata_error:
                self.errors.append(SampleError(item.key, item.shard, "metadata", item.metadata_error, False))
            result = next(done)
            if isinstance(result, str):
                self.errors.append(SampleError(item.key, item.shard, "decode", result))
                continue
            width, height, clip, label = result
            self.metas.append(SampleMeta(item, width, height))
            self.clip.append(clip)
            self.label.append(label)
            if len(self.metas) == self.batch_size:
                self.emit()

    def emit(self) -> None:
        label = None if not self.label or self.label[0] is None else self._stack(self.label)
        self.put(DecodedBatch(self.metas, self._stack(self.clip), label, self.errors))
        self.metas, self.clip, self.label, self.errors = [], [], [], []

    def finish(self) -> None:
        if self.metas or self.errors:
            self.emit()

    def _stack(self, parts: list) -> torch.Tensor:
        if not parts:
            return torch.empty((0, 3, 0, 0), dtype=torch.uint8)
        out = torch.from_numpy(np.stack(parts)) if isinstance(parts[0], np.ndarray) else torch.stack(parts)
        return out.pin_memory() if self.pin_memory else out


class CpuDecoder:
    """N decode workers (processes, threads, or inline when N is 0) feeding fixed-size uint8 batches."""

    def __init__(self, specs: DecodeSpecs, workers: int = 1, batch_size: int = 32, mode: str = "process",
                 prefetch: int = 4, pin_memory: bool = False, max_restarts: int = 3, between: bool = False):
        if mode not in ("process", "thread"):
            raise InputError(f"decode mode must be 'process' or 'thread', not {mode!r}")
        self.specs, self.workers, self.batch_size, self.mode = specs, workers, batch_size, mode
        self.prefetch, self.pin_memory, self.max_restarts = prefetch, pin_memory, max_restarts
        self.between = between
        if between:  # one chunk per worker makes one batch: all of them decode it while the model waits
            self.chunk = max(1, -(-batch_size // max(1, workers)))
            self.in_flight = max(1, workers)
        else:  # small chunks spread a batch over all workers; two chunks per worker in flight keep them busy
            self.chunk = max(1, min(16, -(-batch_size // max(1, workers))))
            self.in_flight = 2 * max(1, workers) + 1
        self._pool: cf.Executor | None = None
        self._spill: str | None = None  # the decode processes' result files (workers/decode_job.py)
        self._remove_spill: weakref.finalize | None = None  # removes it; runs once, at close or collection
        self.restarts = 0  # pool restarts (a decode process died) during the current or last shard

    def describe(self) -> dict:
        return {"decode": "cpu", "decode_workers": self.workers,
                "decode_mode": self.mode if self.workers else "inline",
                "decode_schedule": "between" if self.between else "beside"}

    def start(self) -> None:
        """Start the decode processes and return once each is up: each takes a good half second to start (a
        spawned Python), which the first shard's first batch would otherwise wait for while the model idles.
        Called when the worker is built, so this counts as the worker's start-up, not as its first shard."""
        if self.workers and self._pool is None:
            self._pool = self._new_pool()
            if self.mode == "process":
                # The pool starts a process per task waiting for one; a reply means its initializer has run.
                started = [self._pool.submit(os.getpid) for _ in range(self.workers)]
                cf.wait(started, timeout=START_TIMEOUT_S)

    def pids(self) -> list[int]:
        """The decode processes' ids (for tests and diagnostics)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def close(self) -> None:
        """Stop the decode workers and wait for them to exit (their semaphores are released while the process
        that made them is alive)."""
        self._drop_pool(wait=True)
        if self._remove_spill is not None:
            self._remove_spill()  # results of chunks whose replies never came
            self._spill = self._remove_spill = None

    def _drop_pool(self, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def batches(self, samples: Iterable[RawSample | SampleError]) -> Iterator[DecodedBatch]:
        if self.between:  # decoded on demand: nothing decodes while the consumer holds a batch
            return self._decode(samples)
        return produced_ahead(lambda put: self._conduct(samples, put), self.prefetch, "decode-conductor")

    def _conduct(self, samples: Iterable, put) -> None:
        for batch in self._decode(samples):
            put(batch)

    def _decode(self, samples: Iterable) -> Iterator[DecodedBatch]:
        assembled: deque = deque()
        assembler = _Assembler(self.batch_size, self.pin_memory, assembled.append)
        self.restarts = 0
        outstanding: deque = deque()  # [chunk, future] in shard order

        def collect(keep: int) -> Iterator[DecodedBatch]:
            while len(outstanding) > keep:
                self._collect(outstanding, assembler)
                while assembled:
                    yield assembled.popleft()

        for chunk in chunks(samples, self.chunk):
            if self.between and len(outstanding) == self.in_flight:
                # A batch's chunks, all collected before the next is submitted. (Error records shift a batch
                # past a chunk's end; then the chunks after it decode while the model runs, as `beside`.)
                yield from collect(0)
            outstanding.append([chunk, self._submit(chunk)])
            if not self.between:
                yield from collect(self.in_flight)
        yield from collect(0)
        assembler.finish()
        yield from assembled

    def _submit(self, chunk: list) -> cf.Future:
        jobs = [(s.image, s.image_format) for s in chunk if isinstance(s, RawSample)]
        if not self.workers or not jobs:
            done: cf.Future = cf.Future()
            done.set_result([decode_one(self.specs, data, fmt) for data, fmt in jobs])
            return done
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            if self.mode == "thread":
                return self._pool.submit(decode_chunk, jobs, self.specs)
            return self._pool.submit(decode_chunk_to_file, jobs, self._spill)
        except cf.process.BrokenProcessPool as err:  # died since the last collect: fail like a pending chunk
            failed: cf.Future = cf.Future()
            failed.set_exception(err)
            return failed

    def _collect(self, outstanding: deque, assembler: _Assembler) -> None:
        while True:
            try:
                results = read_chunk_file(outstanding[0][1].result())
                break
            except cf.process.BrokenProcessPool as err:
                self._restart(outstanding, err)
        assembler.add(outstanding.popleft()[0], results)

    def _restart(self, outstanding: deque, err: Exception) -> None:
        """A decode process died: start a fresh pool and decode again every chunk without a result."""
        self.restarts += 1
        self._drop_pool(wait=False)  # a broken pool: its processes are gone or going
        if self.restarts > self.max_restarts:
            raise ClusterError(f"decode workers died {self.restarts} times ({err}); giving up on this shard")
        for entry in outstanding:
            if not entry[1].done() or entry[1].exception() is not None:
                entry[1] = self._submit(entry[0])

    def _new_pool(self) -> cf.Executor:
        if self.mode == "thread":
            return cf.ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        if self._spill is None:
            self._spill = _results_folder()
            self._remove_spill = weakref.finalize(self, shutil.rmtree, self._spill, True)  # also if never closed
        # spawn, not fork: the parent runs OpenMP threads, which a forked child must not inherit
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=init_worker, initargs=(self.specs, self._spill))


_FOLDER_PREFIX = "shardlight-decode-"


def _results_folder() -> str:
    """A private folder for the decode processes' result files, named after this process; first removes the
    folders of processes that are gone (a worker killed with its decode processes leaves its folder behind)."""
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"{_FOLDER_PREFIX}*-*")):
        owner = os.path.basename(stale)[len(_FOLDER_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-")
