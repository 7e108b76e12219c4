import pytest
import torch

from shardlight.models.device import batch_from_free_memory, pick_batch_size, pick_device, pick_dtype

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_defaults():
    cpu = torch.device("cpu")
    assert pick_dtype(cpu, "auto") == torch.float32
    assert pick_dtype(cpu, "bf16") == torch.bfloat16
    assert pick_batch_size(cpu, None) == 32 and pick_batch_size(cpu, 7) == 7
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype(cpu, "auto", params=1_000) == torch.float32  # a demo-sized model stays in fp32


def test_cpu_auto_bf16_needs_native_bf16_and_a_large_model(monkeypatch):
    from shardlight.models import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype(cpu, "auto", params=150_000_000) == torch.bfloat16
    assert pick_dtype(cpu, "auto", params=5_000_000) == torch.float32
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype(cpu, "auto", params=150_000_000) == torch.float32


def test_gpu_batch_size_follows_free_memory():
    gib = 1 << 30
    assert batch_from_free_memory(79 * gib) == 512  # an idle H100
    assert batch_from_free_memory(10 * gib) == 128
    assert batch_from_free_memory(1 * gib) == 32  # never below the floor


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_asking_for_cuda_without_a_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        pick_device("cuda")


@pytest.mark.gpu
@cuda
def test_gpu_defaults_and_autocast_embedding(tmp_path):
    from shardlight.core.config import ClipSpec, ComputeSpec, LabelSpec
    from shardlight.training.synthetic import write_shards
    from workers.embed import ShardEmbedder

    gpu = pick_device("auto")
    assert gpu.type == "cuda" and pick_batch_size(gpu, None) in (32, 64, 128, 256, 512)
    assert pick_dtype(gpu, "auto") in (torch.bfloat16, torch.float16)
    shard = write_shards(tmp_path / "d", 1, 40, seed=1)[0]
    embedder = ShardEmbedder(ClipSpec(model="shapes-clip"), LabelSpec(kind="vit", model="shapes-vit"), ComputeSpec())
    stats = embedder.process(str(shard), str(tmp_path / "out"))
    assert embedder.describe()["device"].startswith("cuda") and stats["rows"] == 40
