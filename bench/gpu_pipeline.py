"""The GPU data path, stage by stage and whole, on img2dataset-like shards generated on the spot.

    python bench/gpu_pipeline.py [--samples 20000] [--rounds 3] [--batch-size N] [--budget-s 120]
    python bench/gpu_pipeline.py --samples 256 --rounds 1 --model shapes-clip   # CPU smoke test

One prepared command for a fresh GPU machine without a package registry: it writes the shards (256-px
photo-like JPEG + caption + img2dataset json, in parallel on every core), a random-weight open_clip
ViT-B-32 to a local file (no hub), then measures images/s of each stage alone and of the whole worker:

  read          ShardReader over the shards, one thread (tar parsing, grouping, json)
  decode-gpu    GpuDecoder.batches: batched JPEG decode + resize/crop on the GPU (per backend), fed as the
                worker feeds it (its reader process on a GPU machine)
  decode-cpu    CpuDecoder.batches with every CPU but one as decode processes (PIL), fed the same way
  tokenise      open_clip's tokenizer on the captions, one thread
  forward       ViT-B-32 image + caption forward (bf16 on a GPU) on uint8 batches already on the device,
                captions pre-tokenised
  pipeline      ShardEmbedder.process per shard: read → decode → forward → Parquet, as a worker runs it
  pipeline[switch 1 ms]  the same with Python's thread switch interval at 1 ms instead of 5: the model
                thread gets the interpreter back sooner after each GPU wait (a candidate, not yet adopted)
  pipeline[K]   the same in K processes sharing the GPU, the shards and the CPUs split between them (what
                `ray.gpus_per_actor: 1/K` runs), measured once after the rounds

Ray and Prefect are not installed on the GPU machine (too large to carry as wheels), so the pipeline is
the worker in-process (what a Ray actor runs per shard), not `shardlight run`. Stages alternate within a
round (rounds interleaved); the table gives the median and the spread over rounds, and each rate as a
ratio of the slowest of decode-gpu and forward alone. With OUT set, the figures go to $OUT/gpu_pipeline.json.
On a machine without CUDA the same stages run on the CPU (decode-gpu then uses torchvision's CPU decoder).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision >= 0.29: decode_jpeg → TorchCodec

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec  # noqa: E402
from shardlight.training.photos import write_photo_shards  # noqa: E402
from workers.decode import CpuDecoder  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402
from workers.gpu_decode import BACKENDS, GpuDecoder, nvimgcodec_available  # noqa: E402
from workers.reader import RawSample, ShardReader  # noqa: E402


def random_weights(model_name: str, folder: Path) -> str:
    """Random weights for an open_clip model saved to a local file: the checkpoint a real run would load."""
    import open_clip

    from shardlight.models.weights import register_repo_models

    register_repo_models()
    torch.manual_seed(0)
    path = folder / f"{model_name}-random.pt"
    torch.save(open_clip.create_model(model_name, pretrained=None).state_dict(), path)
    return str(path)


def count(batches) -> int:
    return sum(len(b.samples) for b in batches)


class Stages:
    """The measured stages over one set of shards; each returns the images it handled."""

    def __init__(self, embedder: ShardEmbedder, shards: list[Path], work: Path, cpu_workers: int):
        self.embedder, self.shards, self.work = embedder, [str(s) for s in shards], work
        self.specs = embedder.decoder.specs
        self.gpu = {}
        for name in self.backends():
            try:
                self.gpu[name] = GpuDecoder(ComputeSpec(), embedder.device, self.specs, cpus=os.cpu_count() or 1,
                                            batch_size=embedder.batch_size, backend=name)
            except Exception as err:  # an optional backend that does not start is reported, not fatal
                print(f"decode backend {name} unavailable: {type(err).__name__}: {err}")
        self.cpu = CpuDecoder(self.specs, workers=cpu_workers, batch_size=embedder.batch_size)
        self.captions = [s.caption or "" for url in self.shards for s in ShardReader(url) if isinstance(s, RawSample)]
        self.prepared: list = []  # (uint8 pixels on the device, token ids) per batch, for `forward`
        self.runs = 0

    def backends(self) -> list[str]:
        if self.embedder.device.type != "cuda":
            return ["torchvision"]
        return [name for name in BACKENDS if name == "torchvision" or nvimgcodec_available()]

    def read(self) -> int:
        return sum(isinstance(s, RawSample) for url in self.shards for s in ShardReader(url))

    def source(self, url: str):
        """The shard as the worker reads it: through its reader process when it has one."""
        reading = self.embedder.reading
        return reading.open(url) if reading else ShardReader(url)

    def decode_gpu(self, backend: str) -> int:
        decoder = self.gpu[backend]
        return sum(count(decoder.batches(self.source(url))) for url in self.shards)

    def decode_cpu(self) -> int:
        return sum(count(self.cpu.batches(self.source(url))) for url in self.shards)

    def tokenise(self) -> int:
        bs, tokenizer = self.embedder.batch_size, self.embedder.clip.tokenizer
        for i in range(0, len(self.captions), bs):
            tokenizer(self.captions[i:i + bs])
        return len(self.captions)

    def prepare_forward(self) -> None:
        """Pixels decoded on the device and captions tokenised, before any clock starts."""
        clip = self.embedder.clip
        for url in self.shards:
            for batch in self.gpu["torchvision"].batches(ShardReader(url)):
                if batch.samples:
                    tokens = clip.tokenizer([m.raw.caption or "" for m in batch.samples])
                    self.prepared.append((batch.clip.clone(), tokens))

    def forward(self) -> int:
        clip = self.embedder.clip
        for pixels, tokens in self.prepared:
            clip.embed_images(pixels)
            clip.embed_tokens(tokens)
        return sum(len(p) for p, _ in self.prepared)

    def pipeline(self) -> int:
        out = self.work / f"out-{self.runs}"
        self.runs += 1
        rows = sum(self.embedder.process(url, str(out))["rows"] for url in self.shards)
        shutil.rmtree(out, ignore_errors=True)
        return rows

    def pipeline_switch(self, seconds: float = 0.001) -> int:
        before = sys.getswitchinterval()
        sys.setswitchinterval(seconds)
        try:
            return self.pipeline()
        finally:
            sys.setswitchinterval(before)

    def all(self) -> dict:
        stages = {"read": self.read, "decode-cpu": self.decode_cpu, "tokenise": self.tokenise,
                  "forward": self.forward, "pipeline": self.pipeline, "pipeline[switch 1 ms]": self.pipeline_switch}
        for name in self.gpu:
            stages[f"decode-gpu[{name}]"] = lambda name=name: self.decode_gpu(name)
        return stages


def _worker_process(model: str, weights: str, shards: list[str], cpus: list[int], batch_size: int | None,
                    out: str, barrier, results) -> None:
    """One of K worker processes: pinned to its CPUs, warmed up on one shard, then timed on its shards."""
    os.sched_setaffinity(0, cpus)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    embedder = ShardEmbedder(ClipSpec(model=model, pretrained=weights), LabelSpec(kind="none"),
                             ComputeSpec(batch_size=batch_size))
    embedder.process(shards[0], f"{out}/warm")
    barrier.wait(timeout=120)  # a sibling that failed to start breaks the barrier instead of hanging us
    start = time.perf_counter()
    rows = sum(embedder.process(url, f"{out}/timed")["rows"] for url in shards)
    results.put((rows, start, time.perf_counter()))
    embedder.close()


def pipeline_processes(k: int, model: str, weights: str, shards: list[Path], batch_size: int | None,
                       work: Path) -> float:
    """images/s of K worker processes on one GPU, from the moment all are ready until the last is done."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0))
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker_process, args=(
        model, weights, [str(s) for s in shards[i::k]], cores[i::k], batch_size, str(work / f"k{k}-{i}"),
        barrier, results)) for i in range(k)]
    for p in procs:
        p.start()
    done: list = []
    while len(done) < k and (any(p.is_alive() for p in procs) or not results.empty()):
        try:
            done.append(results.get(timeout=2))
        except queue.Empty:
            continue
    for p in procs:
        p.join(timeout=30)
    if len(done) < k:
        print(f"pipeline[{k} processes]: {k - len(done)} process(es) failed; see their traceback above")
        return None
    return sum(r for r, _, _ in done) / (max(e for _, _, e in done) - min(s for _, s, _ in done))


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def measure(stages: Stages, rounds: int, deadline: float) -> dict[str, list[float]]:
    """Every stage once per round, the order rotated each round; stops early past the deadline."""
    funcs = stages.all()
    for name, fn in list(funcs.items()):  # warm-up: CUDA kernels, nvJPEG state, decode processes, file cache
        try:
            fn()
        except Exception as err:
            if name != "decode-gpu[nvimgcodec]":
                raise
            print(f"{name} failed, left out: {type(err).__name__}: {err}")
            del funcs[name]
    rates: dict[str, list[float]] = {name: [] for name in funcs}
    names = list(funcs)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            rates[name].append(timed(funcs[name], stages.embedder.device))
        if time.perf_counter() > deadline:
            break
    return rates


def summarise(rates: dict[str, list[float]]) -> dict:
    stats = {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
             for name, v in rates.items()}
    decode = max((k for k in stats if k.startswith("decode-gpu")), key=lambda k: stats[k]["median"])
    slowest = min(stats[decode]["median"], stats["forward"]["median"])
    best = max((k for k in stats if k.startswith("pipeline")), key=lambda k: stats[k]["median"])
    return {"stages": stats, "decode_backend": decode[len("decode-gpu["):-1], "slowest_alone": slowest,
            "pipeline_vs_slowest": stats["pipeline"]["median"] / slowest,
            "best_pipeline": best, "best_pipeline_rate": stats[best]["median"],
            "best_pipeline_vs_slowest": stats[best]["median"] / slowest,
            "pipeline_vs_forward": stats["pipeline"]["median"] / stats["forward"]["median"],
            "decode_gpu_vs_cpu": stats[decode]["median"] / stats["decode-cpu"]["median"]}


def print_table(summary: dict) -> None:
    base = summary["slowest_alone"]
    print(f"{'stage':<26}{'images/s':>10}{'spread':>20}{'÷ slowest':>11}")
    for name, s in summary["stages"].items():
        spread = f"{s['min']:.0f}–{s['max']:.0f}"
        print(f"{name:<26}{s['median']:>10.0f}{spread:>20}{s['median'] / base:>11.2f}")
    print(f"slowest of decode-gpu[{summary['decode_backend']}] and forward alone: {base:.0f} images/s; "
          f"pipeline ÷ slowest {summary['pipeline_vs_slowest']:.2f}, best ({summary['best_pipeline']}) "
          f"{summary['best_pipeline_vs_slowest']:.2f}; decode gpu ÷ cpu workers {summary['decode_gpu_vs_cpu']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=2_500, help="samples per shard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (random weights); smoke: shapes-clip")
    parser.add_argument("--batch-size", type=int, default=None, help="default: from free GPU memory")
    parser.add_argument("--cpu-decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--budget-s", type=float, default=120.0, help="no new round starts after this")
    parser.add_argument("--processes", type=int, nargs="*", default=None,
                        help="also run the pipeline in K processes sharing the device (default: 2 4 on CUDA)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shardlight-gpu-bench-") as tmp:
        tmp = Path(tmp)
        shards = write_photo_shards(tmp / "data", max(1, -(-args.samples // args.shard_size)),
                                    min(args.samples, args.shard_size), seed=19, processes=os.cpu_count() or 1)
        generated = time.perf_counter() - start
        weights = random_weights(args.model, tmp)
        embedder = ShardEmbedder(ClipSpec(model=args.model, pretrained=weights), LabelSpec(kind="none"),
                                 ComputeSpec(batch_size=args.batch_size))
        stages = Stages(embedder, shards, tmp, args.cpu_decode_workers)
        stages.prepare_forward()
        loaded = time.perf_counter() - start
        rates = measure(stages, args.rounds, start + args.budget_s)
        default = [2, 4] if embedder.device.type == "cuda" else []
        for k in (default if args.processes is None else args.processes):
            if k < 2 or len(shards) < k or time.perf_counter() > start + args.budget_s + 30:
                continue  # the table must print within the time the checks allow
            rate = pipeline_processes(k, args.model, weights, shards, args.batch_size, tmp)
            if rate is not None:
                rates[f"pipeline[{k} processes]"] = [rate]
        stats = {name: dict(d.stats) for name, d in stages.gpu.items()}
        worker = embedder.describe()
        stages.cpu.close()
        embedder.close()
    summary = summarise(rates)
    summary.update(machine=machine(), worker=worker, samples=len(stages.captions), shards=len(shards),
                   torch=torch.__version__, generate_s=round(generated, 1), setup_s=round(loaded, 1),
                   total_s=round(time.perf_counter() - start, 1), gpu_decoder_stats=stats)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        Path(os.environ["OUT"], "gpu_pipeline.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{summary['machine']}; {args.model} (random weights), image + caption, {summary['samples']} samples "
          f"in {summary['shards']} shards; {', '.join(f'{k} {v}' for k, v in worker.items() if k != 'dim')}")
    print(f"generate {summary['generate_s']} s, setup {summary['setup_s']} s, total {summary['total_s']} s")
    print_table(summary)


if __name__ == "__main__":
    main()
