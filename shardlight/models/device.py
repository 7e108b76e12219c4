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


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """Autocast dtype: bf16 where the GPU supports it, else fp16; fp32 on CPU unless asked."""
    if precision == "fp32":
        return torch.float32
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_batch_size(device: torch.device, configured: int | None) -> int:
    return configured or (256 if device.type == "cuda" else 32)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
