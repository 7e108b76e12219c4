"""Which decoder a worker uses: `compute.decode` (auto | cpu | gpu) and `compute.decode_workers`.

Kept apart from the decoders themselves (workers/decode.py, workers/gpu_decode.py) because it names both
and the GPU decoder builds on the CPU one.
"""

from __future__ import annotations

import torch

from shardlight.core.config import ComputeSpec
from shardlight.core.errors import InputError
from workers.decode import CpuDecoder, Decoder, DecodeSpecs
from workers.gpu_decode import GpuDecoder


def auto_decode_workers(cpus: int, device: torch.device) -> int:
    """Decode workers for a worker holding `cpus` CPUs: see docs/operations.md for the measurements."""
    if device.type == "cuda":
        return max(1, cpus - 1)  # the GPU does the model work: every CPU but the feeding thread decodes
    return 1  # on a CPU the model dominates (tens of ms per image vs ~2 ms to decode a 256-px JPEG)


def make_decoder(compute: ComputeSpec, device: torch.device, specs: DecodeSpecs, cpus: int,
                 batch_size: int) -> Decoder:
    """The decoder `compute.decode` asks for (`auto`: the GPU decoder on a CUDA worker, else the CPU one)."""
    want = compute.decode
    if want == "gpu" and device.type != "cuda":
        raise InputError("compute.decode is 'gpu' but this worker has no CUDA GPU")
    # auto: a model whose transform has no PixelSpec keeps the CPU path (gpu: GpuDecoder says why)
    if want == "gpu" or (want == "auto" and device.type == "cuda" and GpuDecoder.supports(specs)):
        return GpuDecoder(compute, device, specs, cpus=cpus, batch_size=batch_size)
    workers = compute.decode_workers
    if workers == "auto":
        workers = auto_decode_workers(cpus, device)
    return CpuDecoder(specs, workers=workers, batch_size=batch_size, prefetch=compute.prefetch_batches,
                      pin_memory=device.type == "cuda")
