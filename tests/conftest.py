"""Test environment: offline hubs, a throw-away Prefect home, no telemetry; shard fixtures with damage."""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="shardlight-prefect-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from shardlight.training.synthetic import sample, write_shards  # noqa: E402

SHARDLIGHT = str(Path(sys.executable).with_name("shardlight"))  # the CLI of the environment running the tests
# A small `shardlight run` on the demo models, for the tests that stop and resume runs of the CLI
SMALL_RUN_CONFIG = """
clip: {model: shapes-clip}
labels: {kind: vit, model: shapes-vit, top_k: 2}
compute: {batch_size: 16}
ray: {num_cpus: 2, num_actors: 1}
"""


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Write samples ({__key__, ext: bytes}) as a plain tar; lets tests plant damage."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    add_member(tar, f"{s['__key__']}.{ext}", data)
    return path


def make_samples(n: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    return [sample(rng, f"{prefix}{i:04d}", label_id=i % 24) for i in range(n)]


def write_damaged_shards(root: Path, seed: int = 3) -> dict:
    """Four shards under root/data: 00000 healthy (6 samples); 00001 with a corrupt JPEG (b0001) and a
    caption-less sample (b0002) among 6; 00002 zero bytes; 00003 eight samples cut inside c0005.jpg's data
    (c0000..c0004 whole, c0005's header present)."""
    data = root / "data"
    data.mkdir(parents=True)
    write_shards(data, shards=1, samples_per_shard=6, seed=seed)
    planted = make_samples(6, seed=seed + 1, prefix="b")
    planted[1]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    del planted[2]["txt"]
    planted[2]["json"] = b'{"url": "http://example.com/b0002.jpg", "status": "success"}'
    write_tar(data / "00001.tar", planted)
    (data / "00002.tar").write_bytes(b"")
    full = write_tar(root / "full.tar", make_samples(8, seed=seed + 2, prefix="c"))
    with tarfile.open(full) as tar:
        cut = tar.getmember("c0005.jpg")
    (data / "00003.tar").write_bytes(full.read_bytes()[: cut.offset_data + cut.size // 2])  # inside c0005.jpg
    return {"dir": data, "corrupt_key": "b0001", "no_caption_key": "b0002"}


def running(pid: int) -> bool:
    """Read from /proc, independently of the product's `shardlight.core.processes.alive`: a zombie waiting
    to be reaped counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# What an independent reader (plain tarfile, not the pipeline's ShardReader) sees in each damaged shard:
# sample keys whose first member header is present, and how many of them the pipeline must drop.
DAMAGED_KEYS = {"00000": 6, "00001": 6, "00002": 0, "00003": 6}
DAMAGED_DROPPED = {"00000": 0, "00001": 1, "00002": 0, "00003": 1}  # b0001 corrupt; c0005 cut by truncation


def tar_keys(path: str | Path) -> list[str]:
    """Sample keys in a tar in order of first appearance, read with tarfile alone and tolerating damage.

    A key counts once any member header of it is present, even if the truncation cut that member's data:
    the test oracle for "samples read", independent of workers.reader.
    """
    keys: list[str] = []
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                key = info.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if info.isreg() and key not in keys:
                    keys.append(key)
    except (tarfile.TarError, EOFError, OSError):
        pass  # empty or truncated: the keys seen so far are the answer
    return keys


@pytest.fixture
def damaged_shards(tmp_path: Path) -> dict:
    return write_damaged_shards(tmp_path)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session, stopped before pytest closes output."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a small shared CPU, two threads of tiny ops spin-wait (10x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def augmented_cli_run(tmp_path_factory):
    """A real `shardlight run` through the console script, augmentation on: two shards of 8 demo images, the
    shipped demo models, a few DiT images per shard. Yields (OUT, the finished process with its stdout/stderr).
    For the tests that read an output as users do (tests/test_analyst_reads.py) and check what a run prints."""
    import subprocess

    import yaml

    from shardlight.core.config import CONFIG_DIR

    root = tmp_path_factory.mktemp("cli-run")
    write_shards(root / "data", shards=2, samples_per_shard=8, seed=17)
    models = CONFIG_DIR / "models"
    config = {
        "clip": {"model": "shapes-clip", "pretrained": str(models / "shapes-clip.safetensors")},
        "labels": {"kind": "vit", "model": "shapes-vit", "checkpoint": str(models / "shapes-vit.safetensors")},
        "ray": {"num_cpus": 2, "num_actors": 1},
        "index": {"factory": "Flat"},
        "augment": {"enabled": True, "checkpoint": str(models / "shapes-dit.safetensors"),
                    "classes": ["red circle", "blue square"], "generate_per_class": 1, "vary_sources": 1,
                    "vary_per_source": 2, "steps": 4},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "COLUMNS": "200"}
    done = subprocess.run([SHARDLIGHT, "run", str(root / "run.yaml"), "-i", str(root / "data"), "-o", str(root / "out")],
                          capture_output=True, text=True, timeout=800, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out", done
