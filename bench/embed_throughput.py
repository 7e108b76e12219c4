"""Embedding throughput, as ratios against a baseline measured in the same run.

    python bench/embed_throughput.py [--config configs/demo.yaml] [--shards 4] [--samples-per-shard 256]
    python bench/embed_throughput.py --model ViT-B-32 [--samples 1024] [--batch-size 64] [--rounds 2]
        [--precision auto|fp32|bf16] [--decode-schedule auto|beside|between ...]

With a config (default: the demo's models), prints images/s for:
  forward     CLIP image+text forward and the labeler on pre-decoded, pre-transformed tensors
  worker      ShardEmbedder.process in this process: read tar, decode, transform, forward, write Parquet
  flow-stage  the Prefect flow's embedding stage on local Ray, including Ray start and actor model load
  flow-total  the whole flow: Prefect, Ray start, actor model load, embedding, index build
and each as a ratio of `forward`.

With --model (an open_clip architecture, random weights written to a local file; no hub), on 256-px
photo-like JPEG shards with captions of realistic length (bench/common.py), each stage alone, then the
whole `shardlight run` of that model (image + text, no labels, no index), as a ratio of the slowest stage:
  read+decode   tar read, JPEG decode and the CLIP transform, in 1 process, then in one per CPU (one shard
                list each), timed inside the processes (their start-up is not counted)
  image / text  the model's image tower on pre-made tensors, its text tower on the real captions
                (ClipEmbedder.embed_texts, one call per batch), with torch's default threads; image+text
                is their sum in time, the bare model limit
  text, windowed  the text tower on the same captions in the run's windows of several batches
                (ShardEmbedder.text_window), sorted by length across each window as the run embeds them:
                the run ÷ this forward is what the pipeline around the model costs
  run           `shardlight run` in a fresh process, wall clock (Prefect server, Ray, model load included;
                the Prefect database is created before, untimed), and its embedding stage's rate from the
                run summary; with several --decode-schedule values, one run of each per round
  in-process    ShardEmbedder.process (the run's worker, decode schedule of the first --decode-schedule)
                in this process, each shard between two bare forwards on its own tensors: its ratio per
                shard, free of the drift between minutes that separates the forward from the run
  CPU ceiling   on a machine without a GPU, the CPU seconds per image of the forward and of read+decode
                (each timed by process CPU time) and the rate the cores allow when both share them
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    bench_env,
    machine,
    prime_prefect,
    print_ratios,
    run_shardlight,
    worker_line,
    write_photo_shards,
    write_random_clip,
    write_run_config,
)
from shardlight.core.config import CONFIG_DIR, load_config  # noqa: E402
from shardlight.training.synthetic import write_shards  # noqa: E402
from workers.embed import ShardEmbedder  # noqa: E402
from workers.reader import RawSample, ShardReader, decode  # noqa: E402


def bare_forward(embedder: ShardEmbedder, shards: list[Path]) -> float:
    """images/s of the models alone: every image decoded and transformed before the clock starts."""
    prepared = []
    for shard in shards:
        for raw in ShardReader(str(shard)):
            if isinstance(raw, RawSample):
                prepared.append((embedder._prepare(decode(raw)), raw.caption))
    bs = embedder.batch_size
    start = time.perf_counter()
    for i in range(0, len(prepared), bs):
        chunk = prepared[i: i + bs]
        image_emb = embedder.clip.embed_images(torch.stack([p[1] for p, _ in chunk]))
        embedder.clip.embed_texts([c for _, c in chunk])
        if embedder.labeler is not None:
            px = None if embedder.labeler.uses_clip_pixels else torch.stack([p[2] for p, _ in chunk])
            embedder.labeler(px, image_emb)
    return len(prepared) / (time.perf_counter() - start)


def in_process_worker(embedder: ShardEmbedder, shards: list[Path], out: Path) -> float:
    start = time.perf_counter()
    rows = sum(embedder.process(str(s), str(out))["rows"] for s in shards)
    return rows / (time.perf_counter() - start)


def whole_flow(config: Path, data: Path, out: Path) -> tuple[float, float]:
    from flows.pipeline import pipeline

    cfg = load_config(config, input=str(data), output=str(out))
    start = time.perf_counter()
    summary = pipeline(cfg.model_dump())
    total = time.perf_counter() - start
    return summary["images_per_s"], summary["rows"] / total


def _decode_shards(shards: list[Path], preprocess) -> tuple[int, float, float, float]:
    """One decode process: every sample of its shards read, decoded and transformed; (count, start, end,
    CPU seconds)."""
    torch.set_num_threads(1)  # a decode worker is one thread; the model owns the other threads
    start, cpu, count = time.time(), time.process_time(), 0
    for shard in shards:
        for raw in ShardReader(str(shard)):
            if isinstance(raw, RawSample):
                preprocess(decode(raw).image)
                count += 1
    return count, start, time.time(), time.process_time() - cpu


def decode_rate(shards: list[Path], preprocess, workers: int) -> tuple[float, float]:
    """images/s of read+decode+transform in `workers` fresh processes, each given every workers-th shard, and
    the CPU seconds it cost per image."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = pool.starmap(_decode_shards, [(shards[w::workers], preprocess) for w in range(workers)])
    count = sum(n for n, _, _, _ in done)
    return count / (max(end for _, _, end, _ in done) - min(start for _, start, _, _ in done)), \
        sum(cpu for _, _, _, cpu in done) / count


def forward_batches(embedder: ShardEmbedder, shards: list[Path]) -> tuple[list, list[int]]:
    """The shards' images as transformed tensors in batches of the run's size with their captions, decoded
    once before any clock starts, and each caption's token count."""
    pixels, captions = [], []
    for shard in shards:
        for raw in ShardReader(str(shard)):
            if isinstance(raw, RawSample):
                pixels.append(embedder.clip.preprocess(decode(raw).image))
                captions.append(raw.caption)
    bs = embedder.batch_size
    batches = [(torch.stack(pixels[i: i + bs]), captions[i: i + bs]) for i in range(0, len(pixels), bs)]
    tokens = [int((row != 0).sum()) for row in embedder.clip.tokenizer(captions)]
    return batches, tokens


def forward_rates(embedder: ShardEmbedder, batches: list) -> tuple[float, float, float, float]:
    """images/s of the image tower, captions/s of the text tower alone (ClipEmbedder's own calls), one batch
    a call and in the run's windows of `text_window` captions; and the CPU seconds per image of the image
    tower plus the windowed text tower (all of this process's threads)."""
    embedder.clip.embed_images(batches[0][0])  # warm-up: first-call allocations
    embedder.clip.embed_texts(batches[0][1])
    start, cpu = time.perf_counter(), time.process_time()
    for px, _ in batches:
        embedder.clip.embed_images(px)
    image_s, image_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    for _, texts in batches:
        embedder.clip.embed_texts(texts)
    text_s = time.perf_counter() - start
    captions = [c for _, texts in batches for c in texts]
    window = embedder.text_window
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(captions), window):
        embedder.clip.embed_texts(captions[i: i + window])
    windowed_s, windowed_cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(captions)
    return n / image_s, n / text_s, n / windowed_s, (image_cpu + windowed_cpu) / n


def in_turn(image_rate: float, text_rate: float) -> float:
    """images/s of the image tower and then the text tower over the same images: their times add."""
    return 1 / (1 / image_rate + 1 / text_rate)


def interleaved_pipeline(embedder: ShardEmbedder, shards: list[Path], out: Path) -> list[tuple[float, float, float]]:
    """Per shard: the bare forward on its pre-made tensors, `ShardEmbedder.process` on the shard, the bare
    forward again, all in this process and seconds apart, so the VM's drift hits both sides alike; after one
    shard processed as a warm-up. (pipeline images/s, mean image+text forward, mean windowed) per shard."""
    embedder.process(str(shards[0]), str(out / "warm-up"))
    results = []
    for shard in shards:
        batches, _ = forward_batches(embedder, [shard])
        before = forward_rates(embedder, batches)
        stats = embedder.process(str(shard), str(out / "interleaved"))
        after = forward_rates(embedder, batches)
        results.append((stats["images_per_s"], *(statistics.mean(in_turn(f[0], f[k]) for f in (before, after))
                                                  for k in (1, 2))))
    return results


def model_stages(args) -> None:
    """Each stage of a `--model` run alone, then the whole `shardlight run`, as ratios of the slowest stage.

    With `--rounds N` the forward and the runs alternate, forward first and last (forward, runs, forward, …,
    forward), and every figure is the median over the rounds; each run's ratio is to the mean of the forwards
    just before and just after it: this VM's speed drifts between minutes, and bracketing makes the drift hit
    both sides alike."""
    n = args.samples or args.shards * args.samples_per_shard
    schedules = args.decode_schedule
    image, text, windowed, forward_cpu = [], [], [], []
    stage: dict[str, list[float]] = {s: [] for s in schedules}
    wall: dict[str, list[float]] = {s: [] for s in schedules}
    workers_seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="shardlight-bench-") as tmp:
        tmp = Path(tmp)
        shards = write_photo_shards(tmp / "data", n, args.shards)
        weights = write_random_clip(args.model, tmp / f"{args.model}-random.safetensors")
        configs = {s: write_run_config(tmp / f"run-{s}.yaml", args.model, weights, args.batch_size, args.precision, s)
                   for s in schedules}
        cfg = load_config(configs[schedules[0]])
        embedder = ShardEmbedder(cfg.clip, cfg.labels, cfg.compute)
        workers = min(os.cpu_count() or 1, args.shards)
        decode_one, decode_cpu = decode_rate(shards, embedder.clip.preprocess, 1)
        decode_all, _ = decode_rate(shards, embedder.clip.preprocess, workers)
        threads = torch.get_num_threads()
        batches, tokens = forward_batches(embedder, shards)
        describe = ", ".join(f"{k} {v}" for k, v in embedder.describe().items()
                             if k != "dim" and not k.startswith("decode"))
        env = bench_env(tmp)
        prime_prefect(env)
        for r in range(args.rounds + 1):
            steps = ["forward", *schedules[r % len(schedules):], *schedules[:r % len(schedules)]]
            for step in steps if r < args.rounds else ["forward"]:
                if step == "forward":
                    i, t, w, cpu = forward_rates(embedder, batches)
                    forward_cpu.append(cpu)
                    image.append(i)
                    text.append(t)
                    windowed.append(w)
                    print(f"forward {r + 1}: image {i:.1f}/s, text {t:.1f}/s (windowed {w:.1f}/s), image+text "
                          f"{in_turn(i, t):.1f}/s (windowed {in_turn(i, w):.1f}/s)", flush=True)
                else:
                    out = tmp / f"run-out-{r}-{step}"
                    seconds, summary = run_shardlight(configs[step], tmp / "data", out, env)
                    stage[step].append(summary["images_per_s"])
                    wall[step].append(summary["rows"] / seconds)
                    workers_seen[step] = worker_line(summary)
                    print(f"round {r + 1}: shardlight run (decode {step}) {wall[step][-1]:.1f}/s wall clock, "
                          f"{stage[step][-1]:.1f}/s in its embedding stage (counted from its workers up, "
                          f"{summary['worker_startup_s']:.1f} s after it began)", flush=True)
        interleaved = interleaved_pipeline(embedder, shards, tmp / "in-process")
        del embedder, batches
    both = [in_turn(i, t) for i, t in zip(image, text)]
    both_windowed = [in_turn(i, w) for i, w in zip(image, windowed)]
    med = statistics.median
    stages = {f"read+decode, {workers} workers": decode_all, "image+text forward": med(both)}
    slowest = min(stages, key=stages.get)
    print(f"\n{machine()}; {args.model} random weights ({describe}, {threads} torch threads); {n} images of "
          f"256 px in {args.shards} shards; caption tokens median {statistics.median(tokens):.0f}, max {max(tokens)}"
          f"; rounds: {args.rounds}, each run between two forwards (medians)")
    runs = []
    for s in schedules:
        runs += [(f"shardlight run ({s}), embedding stage", med(stage[s])),
                 (f"shardlight run ({s}), wall clock", med(wall[s]))]
    print_ratios([("read+decode, 1 worker", decode_one), (f"read+decode, {workers} workers", decode_all),
                  ("image forward", med(image)), ("text forward", med(text)), ("image+text forward", med(both)),
                  ("text forward, windowed", med(windowed)), ("image+text forward, windowed", med(both_windowed)),
                  *runs], "÷ slowest", base=stages[slowest])
    print(f"slowest stage alone: {slowest}")
    if not torch.cuda.is_available():
        # Decoding and the forward share the CPU: each image costs the forward's CPU seconds plus its decode's
        # (measured, so idle threads are not charged; threads spinning while they wait are).
        cores, forward_per_image = os.cpu_count() or 1, med(forward_cpu)
        ceiling = cores / (forward_per_image + decode_cpu)
        print(f"CPU seconds per image: forward (image + windowed text) {forward_per_image * 1e3:.1f} ms, "
              f"read+decode {decode_cpu * 1e3:.1f} ms; both on these {cores} cores at those costs allow "
              f"{ceiling:.1f}/s = {ceiling / med(both):.3f} of the image+text forward, "
              f"{ceiling / med(both_windowed):.3f} of the windowed one")
    for s in schedules:
        print(f"the run's worker (decode {s}): {workers_seen[s]}")
    pipeline = med(r[0] for r in interleaved)
    for k, name in ((1, "image+text forward"), (2, "image+text forward, windowed")):
        per_shard = [r[0] / r[k] for r in interleaved]
        print(f"ShardEmbedder.process in this process ÷ {name}, interleaved shard by shard: median "
              f"{med(per_shard):.3f} (range {min(per_shard):.3f}–{max(per_shard):.3f}, {len(per_shard)} shards; "
              f"pipeline {pipeline:.1f}/s)")
    if slowest == "image+text forward":
        for s in schedules:
            for name, base in (("image+text forward", both), ("image+text forward, windowed", both_windowed)):
                per_round = [x / statistics.mean(base[r: r + 2]) for r, x in enumerate(stage[s])]
                print(f"embedding stage (decode {s}) ÷ {name}, the forwards either side: median "
                      f"{med(per_round):.3f} (per round {', '.join(f'{x:.3f}' for x in per_round)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "demo.yaml")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--skip-flow", action="store_true", help="only forward and worker (no Ray/Prefect)")
    parser.add_argument("--model", help="an open_clip architecture (e.g. ViT-B-32) with random weights: stages alone vs the run")
    parser.add_argument("--samples", type=int, help="--model: images in all (default shards × samples-per-shard)")
    parser.add_argument("--batch-size", type=int, default=64, help="--model: the run's and the forward's batch")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--model: alternate the bare forward and the run this many times (medians)")
    parser.add_argument("--decode-schedule", nargs="+", default=["auto"], choices=["auto", "beside", "between"],
                        help="--model: the run's compute.decode_schedule; several: one run of each per round, in "
                             "rotating order (auto: between batches on a CPU worker unless its model is a large "
                             "fp32 one)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="--model: compute.precision of the run and the forward (auto: bf16 weights for a "
                             "large CLIP on a CPU with native bf16)")
    args = parser.parse_args()
    if args.model:
        model_stages(args)
        return

    with tempfile.TemporaryDirectory(prefix="shardlight-bench-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
        shards = write_shards(tmp / "data", args.shards, args.samples_per_shard, seed=99)
        cfg = load_config(args.config)
        embedder = ShardEmbedder(cfg.clip, cfg.labels, cfg.compute)
        bare_forward(embedder, shards[:1])  # warm-up
        forward = bare_forward(embedder, shards)
        worker = in_process_worker(embedder, shards, tmp / "worker-out")
        describe = ", ".join(f"{k} {v}" for k, v in embedder.describe().items() if k != "dim")
        del embedder
        if not args.skip_flow:
            stage, total = whole_flow(args.config, tmp / "data", tmp / "flow-out")

    n = args.shards * args.samples_per_shard
    print(f"\n{machine()}; config {args.config.name} ({describe}); {n} images in {args.shards} shards")
    rows = [("forward", forward), ("worker", worker)]
    if not args.skip_flow:
        rows += [("flow-stage", stage), ("flow-total", total)]
    print_ratios(rows, "÷ forward")


if __name__ == "__main__":
    main()
