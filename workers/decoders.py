"""Which decoder a worker uses: `compute.decode` (auto | cpu | gpu), `compute.decode_workers` and
`compute.decode_schedule` (auto | beside | between).

Kept apart from the decoders themselves (workers/decode.py, workers/gpu_decode.py) because it names both
and the GPU decoder builds on the CPU one.
"""

from __future__ import annotations

import torch

from shardlight.core.config import ComputeSpec
from shardlight.core.errors import InputError
from shardlight.models.device import CPU_BF16_MIN_PARAMS
from workers.decode import CpuDecoder, Decoder, DecodeSpecs
from workers.gpu_decode import GpuDecoder


def decode_between(compute: ComputeSpec, device: torch.device, dtype: torch.dtype, params: int) -> bool:
    """`compute.decode_schedule`; auto: `between` on a CPU worker unless its model is a large fp32 one.

    On shared cores a decode process beside the model preempts the model's threads, and each slice it takes
    stalls the others at their next barrier; that costs more than the decoding itself wherever the model
    spends few milliseconds per image (bf16 on AMX, small models), and less than decoding between batches
    where it spends tens (a large fp32 model). Measurements: docs/benchmarks.md, "Decoding between batches"."""
    if compute.decode_schedule != "auto":
        return compute.decode_schedule == "between"
    if device.type != "cpu":
        return False  # the model runs on the GPU: decoding beside it costs it nothing
    return dtype != torch.float32 or params < CPU_BF16_MIN_PARAMS


def auto_decode_workers(cpus: int, device: torch.device, between: bool = False) -> int:
    """Decode workers for a worker holding `cpus` CPUs: see docs/operations.md for the measurements."""
    if device.type == "cuda":
        return max(1, cpus - 1)  # the GPU does the model work: every CPU but the feeding thread decodes
    if between:
        return cpus  # the model waits while a batch decodes: every core decodes it
    return 1  # beside a large fp32 model: it spends tens of ms per image, a decode ~2 ms


def make_decoder(compute: ComputeSpec, device: torch.device, specs: DecodeSpecs, cpus: int,
                 batch_size: int, between: bool = False) -> Decoder:
    """The decoder `compute.decode` asks for (`auto`: the GPU decoder on a CUDA worker, else the CPU one)."""
    want = compute.decode
    if want == "gpu" and device.type != "cuda":
        raise InputError("compute.decode is 'gpu' but this worker has no CUDA GPU")
    # auto: a model whose transform has no PixelSpec keeps the CPU path (gpu: GpuDecoder says why)
    if want == "gpu" or (want == "auto" and device.type == "cuda" and GpuDecoder.supports(specs)):
        return GpuDecoder(compute, device, specs, cpus=cpus, batch_size=batch_size)
    workers = compute.decode_workers
    if workers == "auto":
        workers = auto_decode_workers(cpus, device, between)
    return CpuDecoder(specs, workers=workers, batch_size=batch_size, prefetch=compute.prefetch_batches,
                      pin_memory=device.type == "cuda", between=between)
