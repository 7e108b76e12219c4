"""GPU decoding: batches of JPEG bytes → nvJPEG → resize + centre crop on the GPU → the models' uint8 pixels.

`GpuDecoder` is the second implementation of the decoder interface of `workers/decode.py` (the CPU one is
`CpuDecoder`; the contract is the `Decoder` protocol and the invariants listed there). Invariants:

- **Shard order.** Rows come out in the order samples went in; every error record keeps its place.
- **Only what the GPU decodes as libjpeg does goes to it** (`gpu_decodable`): baseline Huffman JPEGs
  (SOF0/SOF1), 8-bit, 1 or 3 components (not Adobe-RGB), ending with the EOI marker. Everything else —
  progressive, arithmetic, lossless, 12-bit, CMYK/YCCK, truncated, PNG, WebP, not an image — is decoded on
  the CPU by the CPU decoder's own `decode_one`, image by image, and counted in `stats["fallbacks"]`: a
  corrupt image becomes exactly the error record the CPU path writes.
- **No lost batch.** torchvision's batched call fails whole when one image fails; the batch is then
  retried image by image (`stats["retries"]`) and the images that fail alone go to the CPU.
- **One decode call at a time.** torchvision's CUDA decoder holds one lock per process; only this
  decoder's decode thread calls it.
- **Geometry is `to_uint8`'s**: torchvision's `Resize(int)` output size and centre-crop origin. The resize
  is antialiased with PIL's kernels (bicubic a=-0.5, or bilinear), computed in float32 and rounded to
  uint8: close to PIL, not bit-identical (checked by embedding cosine in tests/test_gpu_decode.py).
- **Streams.** Decode and resize run on a side stream in the decode thread, overlapping the model's
  forward pass on its own stream; a batch is handed over only once its GPU work is done (the decode
  thread waits for it, never the model thread), and its tensors are recorded on the consumer's stream
  so that the caching allocator cannot hand their memory out early.
- **Host memory.** JPEG bytes are packed into one pinned buffer per batch and the CPU fallbacks' pixels
  are uploaded from pinned memory with non-blocking copies.
- On a CPU device the same code runs with torchvision's CPU JPEG decoder: that is how the routing, the
  retries and the ordering are tested on machines without CUDA. `make_decoder` never picks it there.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from shardlight.core.config import ComputeSpec
from shardlight.core.errors import InputError
from shardlight.core.schema import SampleError
from shardlight.models.preprocess import PixelSpec, resized_size
from workers.decode import CpuDecoder, DecodedBatch, _Assembler, chunks, produced_ahead
from workers.decode_job import DecodeSpecs, decode_one
from workers.reader import RawSample

_SOF_BASELINE = (0xC0, 0xC1)  # baseline and extended sequential, Huffman coded
_SOF_REFUSED = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDA, 0xD9}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field


def gpu_decodable(data: bytes) -> bool:
    """True for a complete baseline JPEG with 1 or 3 components (nvJPEG's hardware path decodes these
    as libjpeg does); False sends the image to the CPU. Reads only the marker segments before SOF."""
    if len(data) < 8 or data[:2] != b"\xff\xd8" or not data.endswith(b"\xff\xd9"):
        return False
    i, n, adobe_rgb = 2, len(data), False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xEE and data[i + 4:i + 9] == b"Adobe" and length >= 14:
            adobe_rgb = data[i + 15] == 0  # transform 0: the 3 channels are RGB, not YCbCr
        if marker in _SOF_BASELINE:
            precision, height, width = data[i + 4], (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            comps = data[i + 9] if i + 9 < n else 0
            return precision == 8 and height > 0 and width > 0 and (comps == 1 or (comps == 3 and not adobe_rgb))
        if marker in _SOF_REFUSED:
            return False
        i += 2 + length
    return False


def crop_origin(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop, as `to_uint8` crops."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_crop(batch: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """(n, 3, H, W) uint8 of one size → (n, 3, S, S) uint8: shortest side to `spec.resize`, centre crop."""
    height, width = batch.shape[-2:]
    new_w, new_h = resized_size(width, height, spec.resize)
    if (new_w, new_h) != (width, height):  # like torchvision, an image already at size is left untouched
        out = F.interpolate(batch.float(), size=(new_h, new_w), mode=spec.interpolation, antialias=True,
                            align_corners=False)
        batch = out.round_().clamp_(0, 255).to(torch.uint8)
    top, left = crop_origin(new_h, new_w, spec.size)
    return batch[:, :, top:top + spec.size, left:left + spec.size]


def fit(images: list[torch.Tensor], spec: PixelSpec) -> torch.Tensor:
    """Decoded (3, H, W) images of any sizes → (N, 3, S, S) uint8, one resize call per distinct size."""
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    if len(by_size) == 1:
        return resize_crop(torch.stack(images), spec).contiguous()
    device = images[0].device
    out = torch.empty((len(images), 3, spec.size, spec.size), dtype=torch.uint8, device=device)
    for rows in by_size.values():
        out[torch.tensor(rows, device=device)] = resize_crop(torch.stack([images[i] for i in rows]), spec)
    return out


class TorchvisionJpeg:
    """torchvision's batched `decode_jpeg`: nvJPEG (hardware engine where the GPU has one) on CUDA."""

    name = "torchvision"

    def __init__(self, device: torch.device):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device, self._decode, self._rgb = device, decode_jpeg, ImageReadMode.RGB
        self._host = torch.empty(0, dtype=torch.uint8)

    def _packed(self, datas: list[bytes]) -> list[torch.Tensor]:
        """Views of one (pinned, reused) host buffer holding every bitstream of the batch."""
        total = sum(len(d) for d in datas)
        if self._host.numel() < total:
            self._host = torch.empty(int(total * 1.25), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        flat, views, at = self._host.numpy(), [], 0
        for d in datas:
            flat[at:at + len(d)] = np.frombuffer(d, np.uint8)
            views.append(self._host[at:at + len(d)])
            at += len(d)
        return views

    def decode(self, datas: list[bytes]) -> list[torch.Tensor]:
        return list(self._decode(self._packed(datas), mode=self._rgb, device=self.device))


class NvImageCodecJpeg:
    """nvImageCodec's batched decoder (hardware, then CUDA, then CPU codecs inside the library)."""

    name = "nvimgcodec"

    def __init__(self, device: torch.device):
        from nvidia import nvimgcodec

        self.device = device
        # fancy upsampling of the chroma planes, as libjpeg (and so PIL) does by default
        self.decoder = nvimgcodec.Decoder(device_id=device.index or 0, options=":fancy_upsampling=1")
        self.params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.RGB, allow_any_depth=False,
                                              apply_exif_orientation=False)

    def decode(self, datas: list[bytes]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(self.device).cuda_stream  # results ordered on our stream
        images = self.decoder.decode(datas, params=self.params, cuda_stream=stream)
        # Failed images come back as None (or, in older releases, are left out of the list).
        if len(images) != len(datas) or any(image is None for image in images):
            raise RuntimeError("nvimgcodec could not decode an image of the batch")
        # HWC views of the library's buffers; the tensors keep them alive.
        return [torch.as_tensor(image, device=self.device).permute(2, 0, 1) for image in images]


BACKENDS = {"torchvision": TorchvisionJpeg, "nvimgcodec": NvImageCodecJpeg}
# Chosen by measurement (bench/gpu_pipeline.py, docs/benchmarks.md): torchvision ships with the GPU stack
# a run already has; nvImageCodec is an extra wheel and is used only if it measures faster.
DEFAULT_BACKEND = "torchvision"


def nvimgcodec_available() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def _geometry(spec: PixelSpec) -> tuple:
    return spec.resize, spec.size, spec.interpolation


def _result(width: int, height: int, pixels: list) -> tuple:
    """One decoded image as the CPU decoder's `decode_one` returns it: (width, height, clip, label | None)."""
    return width, height, pixels[0], pixels[1] if len(pixels) > 1 else None


class GpuDecoder(CpuDecoder):
    """JPEG batches decoded and fitted to the models' PixelSpecs on the GPU; the rest on CPU threads.

    Uses the CPU decoder's conductor thread, batch assembly and error bookkeeping unchanged, and replaces
    only how a chunk is decoded: one chunk is one batch's worth of images, decoded in one GPU call.
    """

    def __init__(self, compute: ComputeSpec, device: torch.device, specs: DecodeSpecs, cpus: int = 1,
                 batch_size: int = 256, backend: str = DEFAULT_BACKEND):
        if not self.supports(specs):
            raise InputError("compute.decode 'gpu' needs models whose transforms are resize + centre crop + "
                             "normalise; use decode: cpu (or auto) for this model")
        if backend not in BACKENDS:
            raise InputError(f"GPU decode backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        # The CPU fallback threads: PIL releases the GIL while it decodes; fallbacks are the rare case.
        super().__init__(specs, workers=max(1, min(4, cpus)), batch_size=batch_size, mode="thread",
                         prefetch=compute.prefetch_batches)
        self.device = device
        self.backend = BACKENDS[backend](device)
        self.targets = [s for s in (specs.clip, specs.label) if s is not None]
        self.stats: Counter = Counter()
        self._consumer: torch.cuda.Stream | None = None
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    @staticmethod
    def supports(specs: DecodeSpecs) -> bool:
        """Whether every model's pixels are a PixelSpec (resize + crop + normalise) the GPU can reproduce."""
        return all(isinstance(s, PixelSpec) for s in (specs.clip, specs.label) if s is not None)

    def describe(self) -> dict:
        return {"decode": "gpu", "decode_backend": self.backend.name, "decode_fallback_threads": self.workers}

    def batches(self, samples: Iterable[RawSample | SampleError]) -> Iterator[DecodedBatch]:
        if self._side is not None:  # the stream the caller (the model thread) computes on
            self._consumer = torch.cuda.current_stream(self.device)
        yield from super().batches(samples)

    def _conduct(self, samples: Iterable, put) -> None:
        assembler = _Assembler(self.batch_size, False, self._handing_over(put))

        def read(give) -> None:  # the tar is read on a thread while the GPU decodes
            for chunk in chunks(samples, self.batch_size):
                give(chunk)

        reads = produced_ahead(read, 2, "decode-read")
        try:
            with torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext():
                for chunk in reads:
                    assembler.add(chunk, self._decode_chunk([s for s in chunk if isinstance(s, RawSample)]))
                assembler.finish()
        finally:
            reads.close()

    def _handing_over(self, put):
        """`put` for finished batches: wait for their GPU work here, then mark them used by the consumer."""
        def hand_over(batch: DecodedBatch) -> None:
            if self._side is not None:
                for t in (batch.clip, batch.label):
                    if t is not None and t.is_cuda:
                        t.record_stream(self._consumer)
                self._side.synchronize()
            put(batch)
        return hand_over

    def _decode_chunk(self, raws: list[RawSample]) -> list:
        """Per image, in order: (width, height, clip px, label px | None) or the CPU path's error message."""
        results: list = [None] * len(raws)
        on_gpu = [i for i, r in enumerate(raws) if gpu_decodable(r.image)]
        decoded = self._gpu_decode([raws[i].image for i in on_gpu])
        done = [(i, image) for i, image in zip(on_gpu, decoded) if image is not None]
        if done:
            images = [image for _, image in done]
            # models with the same resize + crop share the uint8 pixels (normalisation happens later)
            by_geometry: dict = {}
            for spec in self.targets:
                if _geometry(spec) not in by_geometry:
                    by_geometry[_geometry(spec)] = fit(images, spec)
            fitted = [by_geometry[_geometry(spec)] for spec in self.targets]
            for row, (i, image) in enumerate(done):
                results[i] = _result(int(image.shape[2]), int(image.shape[1]), [f[row] for f in fitted])
        on_cpu = [i for i, r in enumerate(results) if r is None]
        self.stats["gpu"] += len(done)
        self.stats["fallbacks"] += len(on_cpu)
        for i, result in zip(on_cpu, self._cpu_decode([raws[i] for i in on_cpu])):
            results[i] = result
        self.stats["errors"] += sum(isinstance(r, str) for r in results)
        if self._side is not None:  # the chunk's GPU work is done before its host buffer is refilled
            self._side.synchronize()
        return results

    def _gpu_decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """One batched call; if it fails (one bad image fails it whole), each image alone; None: refused."""
        if not datas:
            return []
        try:
            return self.backend.decode(datas)
        except Exception:  # torchvision raises RuntimeError, nvimgcodec its own types
            self.stats["retries"] += 1
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(self.backend.decode([data])[0])
            except Exception:
                out.append(None)
        return out

    def _cpu_decode(self, raws: list[RawSample]) -> list:
        """The CPU decoder's own `decode_one` per image; pixels uploaded from pinned memory."""
        if not raws:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode-fallback")
        results = list(self._pool.map(lambda r: decode_one(self.specs, r.image, r.image_format), raws))
        good = [i for i, r in enumerate(results) if not isinstance(r, str)]
        if good:
            uploaded = [self._upload([results[i][2 + k] for i in good]) for k in range(len(self.targets))]
            for row, i in enumerate(good):
                results[i] = _result(results[i][0], results[i][1], [u[row] for u in uploaded])
        return results

    def _upload(self, arrays: list[np.ndarray]) -> torch.Tensor:
        host = torch.from_numpy(np.stack(arrays))
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)
