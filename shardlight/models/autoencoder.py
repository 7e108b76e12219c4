"""A small convolutional autoencoder for the demo images, the latent space of the latent demo DiT.

Built like Stable Diffusion's AutoencoderKL at toy size: residual conv blocks with GroupNorm and SiLU,
strided convolutions down, nearest-neighbour up-sampling plus a convolution up, and an encoder that outputs
a diagonal Gaussian (mean, log-variance) kept near N(0, I) by a small KL term in training. Encoding for
diffusion takes the mean, so an image has one latent; latents are then shifted and scaled by factors measured
on the training set (zero mean, unit variance), as SD does with its 0.18215. The shift and scale are buffers,
saved with the weights.

Files are fp16 safetensors whose header holds the architecture (`autoencoder_config`) and `weights_sha256`, a
digest of the tensors that a latent DiT records so that it is never decoded by an autoencoder it was not
trained on. `load_autoencoder` finds a file by name (beside the DiT, then configs/models/) or by path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from shardlight.core.errors import ModelLoadError
from shardlight.models.weights import MODEL_DIR, load_weights_file, read_weights_metadata


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of one autoencoder; stored in its weights' header so a file rebuilds itself."""

    image_size: int = 64  # pixels per side, in and out
    latent_channels: int = 4  # C of the latent grid
    widths: tuple[int, ...] = (32, 64)  # channels after each down-sampling (each halves the side)
    stem_width: int = 16  # channels of the decoder's full-resolution block

    @property
    def factor(self) -> int:
        return 2 ** len(self.widths)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels, eps=1e-6)


class ResBlock(nn.Module):
    """(GroupNorm → SiLU → conv3×3) twice, plus the identity: the SD VAE's block at a fixed width."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """Pixels in [-1, 1] → (mean, log-variance) of the latent, each (N, C, side/f, side/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        layers, cin = [], 3
        for width in cfg.widths:  # a strided 4×4 convolution halves the side, then one residual block
            layers += [nn.Conv2d(cin, width, 4, stride=2, padding=1), ResBlock(width)]
            cin = width
        self.body = nn.Sequential(*layers, _norm(cin), nn.SiLU())
        self.moments = nn.Conv2d(cin, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.moments(self.body(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)


class Decoder(nn.Module):
    """Latent (N, C, side/f, side/f) → pixels (unclamped: the training loss sees the raw output)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = cfg.widths[::-1]
        layers = [nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1), ResBlock(widths[0])]
        for cin, cout in zip(widths, widths[1:] + (cfg.stem_width,)):  # up-sample, convolve to the next width
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), ResBlock(cout)]
        self.body = nn.Sequential(*layers, _norm(cfg.stem_width), nn.SiLU(),
                                  nn.Conv2d(cfg.stem_width, 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class Autoencoder(nn.Module):
    """Encoder + decoder; `encode`/`decode` speak diffusion latents (shifted and scaled to unit variance)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → diffusion latents: the posterior mean, shifted and scaled."""
        return (self.encoder(x)[0] - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents → pixels in [-1, 1]."""
        return self.decoder(z / self.scale + self.shift).clamp(-1, 1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: a posterior sample z through the decoder → (raw reconstruction, mean KL per latent
        element, z in the decoder's raw units)."""
        mean, logvar = self.encoder(x)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)  # CPU draws: same on every device
        z = mean + (0.5 * logvar).exp() * noise
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        return self.decoder(z), kl, z

    @torch.no_grad()
    def set_latent_scale(self, raw_means: torch.Tensor) -> None:
        """Shift and scale from raw posterior means of training images: zero mean, unit variance (SD's recipe)."""
        self.shift.fill_(raw_means.mean())
        self.scale.fill_(1 / raw_means.std())


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (the file's header, with its times, is left out)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def autoencoder_file(name_or_path: str, search: Iterable[Path] = ()) -> Path:
    """The weights file: `name_or_path` itself, else NAME.safetensors in each `search` folder, then configs/models/."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    folders = [*search, MODEL_DIR]
    for folder in folders:
        candidate = Path(folder) / f"{name_or_path}.safetensors"
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"autoencoder {name_or_path!r} not found (looked for {name_or_path}.safetensors in "
                         f"{', '.join(str(f) for f in folders)})")


def load_autoencoder(name_or_path: str, search: Iterable[Path] = (), digest: str | None = None) -> Autoencoder:
    """An autoencoder in eval mode from its file; `digest` (a DiT's record of it) must match its weights."""
    path = autoencoder_file(name_or_path, search)
    meta = read_weights_metadata(path)
    if "autoencoder_config" not in meta:
        raise ModelLoadError(f"{path} is not an autoencoder file (no autoencoder_config in its header)")
    if digest and meta.get("weights_sha256") != digest:
        raise ModelLoadError(f"autoencoder {path} is not the one the DiT was trained on (weights digest differs): "
                             "retrain the latent DiT or restore that autoencoder")
    config = json.loads(meta["autoencoder_config"])
    model = Autoencoder(AutoencoderConfig(**{**config, "widths": tuple(config["widths"])}))
    model.load_state_dict({k: v.float() for k, v in load_weights_file(path).items()})
    return model.eval().requires_grad_(False)


def autoencoder_header(model: Autoencoder, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The header fields a loader needs: the architecture and the digest of the tensors saved."""
    return {"autoencoder_config": json.dumps(asdict(model.config)), "weights_sha256": weights_digest(state)}
