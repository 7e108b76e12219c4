"""Hardware choices made once per worker: device, autocast dtype and batch size follow what is present."""

from __future__ import annotations

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but this worker has no CUDA GPU")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


# CPU bf16 pays only with native bf16 matrix units, and most for a model big enough to be matmul-bound (the
# CLIP then runs bf16 weights: models/clip.py); speed and agreement with fp32 for ViT-B-32 and the demo models
# are in docs/benchmarks.md ("bf16 weights on an AMX CPU").
CPU_BF16_MIN_PARAMS = 50_000_000


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: without them bf16 matmuls are emulated and slower than fp32."""
    import torch.cpu

    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def pick_dtype(device: torch.device, precision: str = "auto", params: int | None = None) -> torch.dtype:
    """Autocast dtype: bf16 where the GPU supports it, else fp16. On a CPU, `auto` is bf16 only for models
    of at least CPU_BF16_MIN_PARAMS `params` on a CPU with native bf16, else fp32."""
    if precision == "fp32":
        return torch.float32
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if params is not None and params >= CPU_BF16_MIN_PARAMS and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


# GPU memory budgeted per image of a batch when the batch size comes from free memory: decoded image,
# float resize buffers and the activations of a ViT-L-sized model in bf16 stay well below it.
GPU_BYTES_PER_IMAGE = 32 << 20
GPU_BATCH_RANGE = (32, 512)


def pick_batch_size(device: torch.device, configured: int | None) -> int:
    """The configured size; else 32 on CPU and, on a GPU, the largest power of two whose budget fits in
    half of the free memory, within GPU_BATCH_RANGE (512 on an idle 80 GB card)."""
    if configured:
        return configured
    if device.type != "cuda":
        return 32
    free, _ = torch.cuda.mem_get_info(device)
    return batch_from_free_memory(free)


def batch_from_free_memory(free_bytes: int) -> int:
    low, high = GPU_BATCH_RANGE
    fits = max(1, free_bytes // 2 // GPU_BYTES_PER_IMAGE)
    return max(low, min(high, 1 << (int(fits).bit_length() - 1)))


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
