"""GPU paths against their CPU reference: same rows, same labels, embeddings equal up to autocast rounding.

Run on a machine with a CUDA GPU (`pytest -m gpu`); skipped everywhere else.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec
from shardlight.core.layout import embeddings_path
from shardlight.training.synthetic import write_shards
from workers.embed import ShardEmbedder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CLIP, LABELS = ClipSpec(model="shapes-clip"), LabelSpec(kind="vit", model="shapes-vit")


def _rows(out, shard) -> dict:
    table = pq.read_table(embeddings_path(str(out), shard.stem))
    return {"key": table["key"].to_pylist(), "label": table["label"].to_pylist(),
            "image": np.array(table["image_embedding"].to_pylist()),
            "text": np.array(table["text_embedding"].to_pylist())}


def test_gpu_shard_matches_cpu_shard(tmp_path):
    shard = write_shards(tmp_path / "data", 1, 64, seed=5)[0]
    gpu = ShardEmbedder(CLIP, LABELS, ComputeSpec(device="cuda"))
    assert gpu.describe()["device"].startswith("cuda") and gpu.dtype in (torch.bfloat16, torch.float16)
    gpu.process(str(shard), str(tmp_path / "gpu"))
    ShardEmbedder(CLIP, LABELS, ComputeSpec(device="cpu")).process(str(shard), str(tmp_path / "cpu"))
    on_gpu, on_cpu = _rows(tmp_path / "gpu", shard), _rows(tmp_path / "cpu", shard)
    assert on_gpu["key"] == on_cpu["key"] and len(on_gpu["key"]) == 64
    # Unit vectors: the dot product is the cosine between the GPU (half precision) and CPU (fp32) embedding.
    assert (on_gpu["image"] * on_cpu["image"]).sum(axis=1).min() > 0.98
    assert (on_gpu["text"] * on_cpu["text"]).sum(axis=1).min() > 0.98
    agree = np.mean([a == b for a, b in zip(on_gpu["label"], on_cpu["label"])])
    assert agree >= 0.95, f"GPU and CPU labels agree on only {agree:.0%}"


def test_dit_on_gpu_is_deterministic_and_close_to_cpu():
    from shardlight.models.sampler import DiTGenerator
    from shardlight.models.weights import MODEL_DIR

    weights = str(MODEL_DIR / "shapes-dit.safetensors")
    gpu = DiTGenerator(weights, device="cuda", dtype=torch.bfloat16)
    labels, seeds = [0, 5, 11, 23], [1, 2, 3, 4]
    first = gpu.generate(labels, seeds, steps=10)
    again = gpu.generate(labels, seeds, steps=10)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    cpu = DiTGenerator(weights).generate(labels, seeds, steps=10)
    # Same seeds draw the same noise on either device; bf16 rounding moves pixels only a little.
    diff = np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(first, cpu)])
    assert diff < 12, f"mean absolute pixel difference GPU vs CPU {diff:.1f}"
