"""A model's eval transform split in two: PIL resize + centre crop to uint8 (CPU), then normalise on the device.

`pixel_spec(transform)` reads the geometry and the normalisation out of a model's own eval transform
(open_clip's `preprocess`, timm's `create_transform`); `to_uint8` then gives exactly the uint8 pixels that
transform's PIL steps produce (same output size arithmetic, same PIL resample, same crop box), and
`normalize` turns a uint8 batch into what its `ToTensor` + `Normalize` would have given, on whatever device
the batch is on. Decode workers ship uint8 (4x smaller than float32) and never import torch: this module
imports it lazily, inside `normalize`, so a decode process stays light.

The worker side of the contract (fixed-size uint8 batches in shard order) is `workers/decode.py`'s `Decoder`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shardlight.core.errors import ModelLoadError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# Steps that only convert the image (to RGB, to a tensor): they carry no geometry or normalisation.
_CONVERSIONS = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb"}


@dataclass(frozen=True)
class PixelSpec:
    """Resize the shortest side to `resize`, centre-crop `size` x `size`, then (x/255 - mean) / std."""

    resize: int
    size: int
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _name(step) -> str:
    return getattr(step, "__name__", type(step).__name__)


def _triple(values) -> tuple[float, float, float]:
    out = tuple(float(v) for v in (values.tolist() if hasattr(values, "tolist") else values))
    if len(out) != 3:
        raise ModelLoadError(f"expected 3 channel values, got {len(out)}")
    return out  # type: ignore[return-value]


def pixel_spec(transform) -> PixelSpec:
    """The PixelSpec of a torchvision Compose (Resize(int) → CenterCrop → conversions → Normalize).

    Raises ModelLoadError for any other transform; the caller then keeps using the transform itself.
    """
    found: dict = {}
    for step in getattr(transform, "transforms", None) or [transform]:
        name = _name(step)
        if name == "Resize":
            size = step.size if isinstance(step.size, int) else list(step.size)
            if isinstance(size, list) and len(size) == 1:
                size = size[0]
            interp = getattr(step.interpolation, "value", str(step.interpolation))
            if not isinstance(size, int) or step.max_size is not None or interp not in _RESAMPLE:
                raise ModelLoadError(f"unsupported Resize({step.size}, {interp}, max_size={step.max_size})")
            found["resize"], found["interpolation"] = size, interp
        elif name == "CenterCrop":
            h, w = step.size
            if h != w:
                raise ModelLoadError(f"unsupported non-square CenterCrop{tuple(step.size)}")
            found["size"] = int(h)
        elif name == "Normalize":
            found["mean"], found["std"] = _triple(step.mean), _triple(step.std)
        elif name not in _CONVERSIONS:
            raise ModelLoadError(f"unsupported transform step {name}")
    missing = {"resize", "size", "mean"} - set(found)
    if missing:
        raise ModelLoadError(f"transform lacks {', '.join(sorted(missing))}")
    if found["resize"] < found["size"]:
        raise ModelLoadError(f"resize {found['resize']} smaller than the crop {found['size']} (padding)")
    return PixelSpec(**found)


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's `Resize(int)` output size (its `_compute_resized_output_size`), as (width, height)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def to_uint8(image: Image.Image, spec: PixelSpec) -> np.ndarray:
    """(3, size, size) uint8: the model's PIL resize and centre crop, without the float conversion."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    out = resized_size(image.width, image.height, spec.resize)
    if out != image.size:  # torchvision returns the image untouched when the size already matches
        image = image.resize(out, _RESAMPLE[spec.interpolation])
    top = int(round((image.height - spec.size) / 2.0))
    left = int(round((image.width - spec.size) / 2.0))
    image = image.crop((left, top, left + spec.size, top + spec.size))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalize(batch, spec: PixelSpec, dtype=None):
    """(N, 3, S, S) uint8 tensor on any device -> float tensor on that device: (x/255 - mean) / std.

    Computed in float32 (as ToTensor + Normalize do) and then cast to `dtype` (default float32).
    """
    import torch  # lazily: decode processes import this module and must not pay for torch

    mean = torch.tensor(spec.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
    # In place: ToTensor's and Normalize's own operations in their order (the same floats), without a second
    # batch-sized tensor for `- mean`: half the time of the out-of-place form (docs/benchmarks.md).
    out = batch.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return out if dtype in (None, torch.float32) else out.to(dtype)


def open_rgb(data: bytes, draft_to: int | None = None) -> tuple[Image.Image, int, int]:
    """Decode image bytes to RGB; returns (image, width, height) with the file's own size.

    `draft_to`: let a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's `draft`, done inside libjpeg) as long
    as both sides stay >= `draft_to`, i.e. only for JPEGs at least twice that size. Callers pass the largest
    resize of the specs they will apply (agreement with a full decode is measured in docs/benchmarks.md).
    Raises whatever PIL raises for bad data.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if draft_to and img.format == "JPEG" and min(width, height) >= 2 * draft_to:
            img.draft(img.mode, (draft_to, draft_to))
        img.load()
        rgb = img.convert("RGB")
    return rgb, width, height
