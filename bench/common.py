"""What every benchmark shares: the machine line, ratio tables, and the ViT-B-32 workload.

The workload stands in for an img2dataset download: 256-px JPEGs of photo-like texture (about 29 KB each,
as real 256-px photos) with captions of realistic length, and an open_clip model with random weights saved
to a local file (speed does not depend on the weights, and nothing is fetched from a hub). Both the
shardlight benchmarks and the clip-retrieval peer bench read the same shards and the same weights file.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from shardlight.core.errors import ShardlightError
from shardlight.core.layout import run_record_path

REPO = Path(__file__).resolve().parent.parent

# Common English words: each is one BPE token, so a caption's token count is its word count plus two.
_WORDS = (
    "a an the of in on at with near by and photo picture image view close up portrait landscape old new "
    "small large red blue green black white yellow wooden modern vintage house car dog cat man woman child "
    "street city beach mountain river forest table chair window door sunset morning night background "
    "design style colorful people garden kitchen room bridge boat tree flower sky water road light"
).split()


class BenchError(ShardlightError, RuntimeError):
    """A benchmark step failed (a peer tool's install or run, a run that lost rows)."""


def machine() -> str:
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def print_ratios(rows: list[tuple[str, float]], ratio_title: str, first_title: str = "measure",
                 base: float | None = None) -> None:
    """One line per (name, images/s), each divided by `base` (default: the first row's rate)."""
    base = rows[0][1] if base is None else base
    width = max(12, *(len(name) + 2 for name, _ in rows))
    print(f"{first_title:<{width}}{'images/s':>10}{ratio_title:>14}")
    for name, value in rows:
        print(f"{name:<{width}}{value:>10.1f}{value / base:>14.2f}")


def median_spread(values: list[float]) -> str:
    """`median (min–max)` of per-round rates, so drift on a shared machine shows."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


# --- the workload -------------------------------------------------------------------------------------

def _photo(rng, size: int):
    """Smooth random colour field plus sensor-like noise: JPEG-compresses like a photo, not like a flat icon."""
    import numpy as np
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.asarray(low).astype(np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _caption(rng) -> str:
    """Lognormal length, median 10 words, 2–60 (web alt-text: mostly short, a long tail)."""
    words = int(min(60, max(2, round(rng.lognormal(math.log(10), 0.5)))))
    return " ".join(rng.choice(_WORDS, words))


def write_photo_shards(out: Path, samples: int, shards: int, size: int = 256, seed: int = 0) -> list[Path]:
    """`samples` img2dataset-like samples (jpg, txt, json) split evenly over `shards` tars 00000.tar …"""
    import numpy as np
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard])
        path = out / f"{shard:05d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(samples * shard // shards, samples * (shard + 1) // shards):
                key = f"{shard:05d}{i:06d}"
                buf = io.BytesIO()
                _photo(rng, size).save(buf, format="JPEG", quality=90)
                text = _caption(rng)
                meta = {"key": key, "url": f"synthetic://photos/{key}.jpg", "caption": text, "status": "success",
                        "width": size, "height": size, "original_width": size, "original_height": size}
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": text.encode(), "json": json.dumps(meta).encode()})
        paths.append(path)
    return paths


def write_random_clip(model: str, path: Path, seed: int = 0) -> Path:
    """An open_clip architecture with random weights, saved as safetensors (open_clip 2.x and 3.x load it)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = open_clip.create_model(model, pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_run_config(path: Path, model: str, weights: Path, batch_size: int, precision: str = "auto",
                     decode_schedule: str = "auto") -> Path:
    """A `shardlight run` config: this CLIP, image and text embeddings only (no labels, index or augmentation)."""
    import yaml

    compute = {"batch_size": batch_size, "precision": precision, "decode_schedule": decode_schedule}
    config = {"clip": {"model": model, "pretrained": str(weights)}, "labels": {"kind": "none"},
              "compute": compute, "index": {"build": False},
              "augment": {"enabled": False}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_line(summary: dict) -> str:
    """The run summary's `worker` record (device, dtype, batch, threads…) without its per-process ids."""
    worker = {k: v for k, v in (summary.get("worker") or {}).items() if k not in ("pid", "node", "error")}
    return ", ".join(f"{k} {v}" for k, v in worker.items()) or "not recorded"


def bench_env(tmp: Path) -> dict[str, str]:
    """Environment for the tools a bench starts: offline, no telemetry, a private Prefect home, this checkout first."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               PREFECT_HOME=str(tmp / "prefect-home"))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # as flows/pipeline.py: loaded machines
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def failed(tool: str, done: subprocess.CompletedProcess) -> BenchError:
    """A one-line error naming the tool's last error line; its whole output is kept in a log file."""
    output = f"{done.stdout}\n{done.stderr}"
    fd, log = tempfile.mkstemp(prefix=f"{tool.replace(' ', '-')}-", suffix=".log")  # outlives the bench's tmp
    with os.fdopen(fd, "w") as f:
        f.write(output)
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if re.search(r"Error\b|Exception\b|error:|failed", line)), None)
    return BenchError(f"{tool} exited {done.returncode}: {cause or (lines or ['no output'])[-1]} (output in {log})")


def prime_prefect(env: dict[str, str]) -> None:
    """Create the private Prefect database before the first timed run: a new one costs ~9 s once, then ~1 s a run."""
    prime = "from prefect import flow\nflow(name='shardlight-bench-prime')(lambda: None)()"
    done = subprocess.run([sys.executable, "-c", prime], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:  # not fatal: the first timed run then pays for the database itself
        print(f"note: priming Prefect failed ({(done.stderr.strip().splitlines() or ['?'])[-1]})", flush=True)


def run_shardlight(config: Path, data: Path, out: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Run `shardlight run` as a user would (a fresh process); returns (wall seconds, the run's summary)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "-i", str(data), "-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise failed("shardlight run", done)
    return wall, json.loads(Path(run_record_path(str(out))).read_text())["summary"]
