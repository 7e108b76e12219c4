"""Images in, images out with a DiT: load weights (the demo's or the published DiT-XL/2), choose pixel or
latent space, then `generate` from class labels or `vary` source images (SDEdit), deterministic per seed.

Three codecs share one interface (`encode(images, device) -> tensor`, `decode(tensor) -> images`): pixels,
a local diffusers `AutoencoderKL` folder (the published models), or this repo's autoencoder
(`shardlight.models.autoencoder`), which a latent demo DiT names in its header and which is loaded by name.

Published DiT checkpoints (`DiT-XL-2-256x256.pt`) name their tensors differently from `shardlight.models.dit`;
`convert_published_state_dict` renames them, and the architecture is read from the tensor shapes. Latent
models decode through a local diffusers `AutoencoderKL` folder (e.g. sd-vae-ft-ema), scaled by 0.18215.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shardlight.core.errors import ModelLoadError, first_line
from shardlight.models.autoencoder import Autoencoder, load_autoencoder
from shardlight.models.device import autocast
from shardlight.models.diffusion import Diffusion, seeded_noise
from shardlight.models.dit import _SIZES, DIT_MODELS, DiT, DiTConfig
from shardlight.models.weights import class_names_for, init_skipped, load_weights_file, read_weights_metadata

VAE_SCALE = 0.18215  # the SD VAE latent scale the published DiT checkpoints were trained with

# Published name pattern -> this implementation's name (blocks' attn/mlp names already agree).
PUBLISHED_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^x_embedder\.proj\.", "patchify.proj."),
    (r"^t_embedder\.mlp\.", "time_embed.mlp."),
    (r"^y_embedder\.embedding_table\.", "label_embed.table."),
    (r"^(blocks\.\d+)\.adaLN_modulation\.1\.", r"\1.modulation."),
    (r"^final_layer\.adaLN_modulation\.1\.", "final.modulation."),
    (r"^final_layer\.linear\.", "final.linear."),
)


def convert_published_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published DiT state dict (`x_embedder`, `adaLN_modulation.1`, …) to `shardlight.models.dit` names."""
    for wrapper in ("ema", "model"):  # training checkpoints nest the weights; the released files do not
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    converted = {}
    for name, tensor in state.items():
        for pattern, repl in PUBLISHED_RENAMES:
            name = re.sub(pattern, repl, name)
        converted[name] = tensor
    return converted


def config_from_state_dict(state: dict[str, torch.Tensor], name: str) -> DiTConfig:
    """Architecture from tensor shapes (depth, width, patch, channels, grid, classes, Σ); heads from `name`."""
    if name not in DIT_MODELS:
        raise ModelLoadError(f"unknown DiT model {name!r} (known: {', '.join(DIT_MODELS)})")
    proj = state["patchify.proj.weight"]  # (d, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = math.isqrt(state["pos_embed"].shape[1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    out = state["final.linear.weight"].shape[0] // (patch * patch)
    expected = _SIZES[name.split("-")[1].split("/")[0]]
    if (depth, hidden) != expected[:2] or patch != int(name.rsplit("/", 1)[1]):
        raise ModelLoadError(f"weights are depth {depth}, width {hidden}, patch {patch}: not {name}")
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                     depth=depth, num_heads=expected[2], num_classes=state["label_embed.table.weight"].shape[0] - 1,
                     learn_sigma=out == 2 * in_channels)


def _load_dit(name: str | None, checkpoint: str | None) -> tuple[DiT, dict]:
    """The model and the header metadata (demo safetensors) or defaults (published .pt)."""
    if not checkpoint:
        raise ModelLoadError("DiT needs local weights: set augment.checkpoint to a .safetensors or .pt file "
                             "(no hub download; see docs/dit.md)")
    if not Path(checkpoint).is_file():
        raise ModelLoadError(f"DiT weights file not found: {checkpoint} (see docs/dit.md for where to get them)")
    meta = read_weights_metadata(checkpoint)
    state = load_weights_file(checkpoint)
    if "dit_config" in meta:
        config = DiTConfig(**json.loads(meta["dit_config"]))
    else:
        state = convert_published_state_dict(state)
        config = config_from_state_dict(state, name or "DiT-XL/2")
    with init_skipped():  # the strict load below replaces every weight
        model = DiT(config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as err:
        raise ModelLoadError(f"DiT weights {checkpoint} do not fit {name}: {first_line(err, with_type=False)}") from None
    return model.eval().requires_grad_(False), meta


class PixelCodec:
    """Pixel-space models: RGB in [-1, 1] at the model's size; outputs are resized to `image_size`."""

    def __init__(self, model_size: int, image_size: int):
        self.model_size, self.image_size = model_size, image_size

    def encode(self, images: list[Image.Image], device: torch.device) -> torch.Tensor:
        arrays = [np.asarray(im.convert("RGB").resize((self.model_size,) * 2, Image.Resampling.BOX), np.float32)
                  for im in images]
        return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1).to(device)

    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        arrays = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a).resize((self.image_size,) * 2, Image.Resampling.BICUBIC) for a in arrays]


class VaeCodec:
    """Latent-space models: a local diffusers AutoencoderKL folder; latents are scaled by 0.18215."""

    def __init__(self, folder: str, image_size: int, device: torch.device):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ModelLoadError("latent DiT needs diffusers: pip install 'shardlight[latent]'") from None
        if not Path(folder).is_dir():
            raise ModelLoadError(f"VAE folder not found: {folder} (a diffusers AutoencoderKL, e.g. sd-vae-ft-ema)")
        try:
            self.vae = AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device).eval()
        except Exception as err:  # diffusers raises OSError/ValueError/EnvironmentError for bad folders
            raise ModelLoadError(f"could not load VAE from {folder}: {first_line(err, with_type=False)[:160]}") from None
        self.image_size = self.model_size = image_size

    @torch.no_grad()
    def encode(self, images: list[Image.Image], device: torch.device) -> torch.Tensor:
        pixels = PixelCodec(self.image_size, self.image_size).encode(images, device)
        return self.vae.encode(pixels).latent_dist.mean * VAE_SCALE  # the mean: deterministic per image

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        return PixelCodec(self.image_size, self.image_size).decode(self.vae.decode(x / VAE_SCALE).sample)


class AutoencoderCodec:
    """Latent demo models: this repo's autoencoder; its own shift and scale map latents to unit variance."""

    def __init__(self, autoencoder: Autoencoder, device: torch.device):
        self.autoencoder = autoencoder.to(device)
        self.image_size = self.model_size = autoencoder.config.image_size
        self.pixels = PixelCodec(self.image_size, self.image_size)

    @torch.no_grad()
    def encode(self, images: list[Image.Image], device: torch.device) -> torch.Tensor:
        return self.autoencoder.encode(self.pixels.encode(images, device))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        return self.pixels.decode(self.autoencoder.decode(x.float()))


def make_codec(meta: dict[str, str], config: DiTConfig, checkpoint: str, vae: str | None, device: torch.device):
    """The codec a DiT's header asks for: its named autoencoder, else a VAE folder (4-channel published
    models), else pixels."""
    if "autoencoder" in meta:  # the repo's latent demo models: found beside the DiT, then in configs/models/
        autoencoder = load_autoencoder(meta["autoencoder"], [Path(checkpoint).parent], meta.get("autoencoder_sha256"))
        return AutoencoderCodec(autoencoder, device)
    if config.in_channels == 4:
        if not vae:
            raise ModelLoadError("this DiT works in VAE latent space: set augment.vae to a local AutoencoderKL folder")
        return VaeCodec(vae, config.input_size * 8, device)
    return PixelCodec(config.input_size, int(meta.get("image_size", config.input_size)))


def _negatives_table(meta: dict[str, str], source: str | None, classes: int,
                     device: torch.device) -> torch.Tensor | None:
    """The header's `guidance_negatives` (per class, the same number of class ids to guide away from) as a
    (classes, k) tensor; None when the model guides from the null class. A malformed table is one line."""
    if "guidance_negatives" not in meta:
        return None
    try:
        table = json.loads(meta["guidance_negatives"])
    except json.JSONDecodeError:
        table = None  # not JSON: malformed like any other wrong shape
    rows = table if isinstance(table, list) and all(isinstance(row, list) for row in table) else []
    if (len(rows) != classes or len({len(row) for row in rows}) != 1 or not rows[0]
            or not all(isinstance(c, int) and 0 <= c < classes for row in rows for c in row)):
        raise ModelLoadError(f"{source}: guidance_negatives must list, for each of its {classes} classes, the "
                             "same number (at least one) of class ids to guide away from")
    return torch.tensor(table, dtype=torch.long, device=device)


class DiTGenerator:
    """A loaded DiT with its schedule and codec; `generate` and `vary` return PIL images."""

    def __init__(self, checkpoint: str | None, name: str | None = None, vae: str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.model, meta = _load_dit(name, checkpoint)
        self.model.to(self.device)
        cfg = self.model.config
        self.class_names = json.loads(meta["class_names"]) if "class_names" in meta else class_names_for(cfg.num_classes)
        self.diffusion = Diffusion(meta.get("schedule", "linear"), int(meta.get("diffusion_steps", 1000)),
                                   meta.get("prediction", "eps"))
        self.default_guidance = float(meta.get("guidance", 4.0))
        self.default_steps = int(meta.get("sample_steps", 50))
        self.negatives = _negatives_table(meta, checkpoint or name, cfg.num_classes, self.device)
        self.codec = make_codec(meta, cfg, checkpoint, vae, self.device)
        self.latent = not isinstance(self.codec, PixelCodec)  # latents are not clamped to [-1, 1] while sampling
        self.name = meta.get("architecture", name)

    @property
    def shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return cfg.in_channels, cfg.input_size, cfg.input_size

    def _labels(self, labels: list[int]) -> torch.Tensor:
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def _negatives(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Each label's classes to guide away from (the header's `guidance_negatives`), or None: the null class."""
        return None if self.negatives is None else self.negatives[labels]

    def generate(self, labels: list[int], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None) -> list[Image.Image]:
        """One image per (label, seed) from pure noise, by deterministic DDIM."""
        noise = seeded_noise(seeds, self.shape, self.device)
        with autocast(self.device, self.dtype):  # the denoiser only; the DDIM update stays fp32
            y = self._labels(labels)
            x = self.diffusion.sample(self.model, noise, y, steps or self.default_steps,
                                      self.default_guidance if guidance is None else guidance, clip=not self.latent,
                                      negatives=self._negatives(y))
        return self.codec.decode(x.float())

    def vary(self, images: list[Image.Image], labels: list[int], seeds: list[int], strength: float,
             steps: int | None = None, guidance: float | None = None) -> list[Image.Image]:
        """SDEdit variations: each source noised to `strength`, then denoised under its label."""
        x0 = self.codec.encode(images, self.device)
        noise = seeded_noise(seeds, self.shape, self.device)
        with autocast(self.device, self.dtype):
            y = self._labels(labels)
            x = self.diffusion.vary(self.model, x0, y, noise, strength,
                                    steps or self.default_steps, self.default_guidance if guidance is None else guidance,
                                    clip=not self.latent, negatives=self._negatives(y))
        return self.codec.decode(x.float())
