"""Diffusion Transformer (DiT), written from Peebles & Xie 2022, "Scalable Diffusion Models with Transformers".

The model follows the paper's Figure 3: an image (pixels or VAE latents) is cut into p×p patches, each a
token with a fixed 2-D sin-cos position; the timestep t and class label y are embedded and summed into
one conditioning vector c; N DiT blocks with adaLN-Zero process the tokens; a final adaptive LayerNorm
and a linear layer predict, per patch, the noise (and optionally Σ), which is rearranged back to an image.

Sizes are small factory functions gathered in `DIT_MODELS` (paper Table 1: S/B/L/XL with patch 2/4/8,
plus a tiny size for the CPU demo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one DiT; stored beside its weights so a checkpoint rebuilds itself."""

    input_size: int = 32  # side of the model's input grid (pixels, or latents = pixels / 8)
    patch_size: int = 2  # p: tokens = (input_size / p)^2
    in_channels: int = 4  # 3 for pixels, 4 for SD-VAE latents
    hidden_size: int = 1152  # d: token width
    depth: int = 28  # N: number of DiT blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # an extra "null" class (id = num_classes) serves classifier-free guidance
    class_dropout: float = 0.1  # probability a training label is replaced by the null class
    learn_sigma: bool = True  # also predict the diagonal covariance Σ (doubles output channels)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a LayerNorm'd token stream scaled and shifted per sample (γ, β regressed from c)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# Embedders ---------------------------------------------------------------------------------------

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Transformer sin-cos features of scalar positions: (len(positions), dim)."""
    freqs = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(positions.reshape(-1), freqs)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D position embedding: half the channels encode the row, half the column (row-major tokens)."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Patchify: non-overlapping p×p patches, each linearly projected to a d-wide token."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, d)


class TimestepEmbedder(nn.Module):
    """Timestep t -> sinusoidal frequencies -> two-layer MLP with SiLU."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) float timesteps -> (N, dim) features, cosines first (the order the published weights expect)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label y -> learned vector; the extra last row is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            dropped = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(dropped, torch.full_like(y, self.null_class), y)
        return self.table(y)


# Transformer ------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention; qkv packed as [q | k | v], each split head-major."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Pointwise feed-forward: d -> ratio·d -> d with tanh-approximated GELU."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c regresses (shift, scale, gate) for attention and for the MLP.

    The gates α start at zero, so an untrained block is the identity on its residual stream.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.modulation = nn.Linear(dim, 6 * dim)  # applied to SiLU(c)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """Adaptive LayerNorm (shift, scale from c), then a linear map from each token to its patch's outputs."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer: (x_t, t, y) -> predicted noise (and Σ) shaped like x_t."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        cfg = self.config = config
        if cfg.input_size % cfg.patch_size or cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"input {cfg.input_size} must divide by patch {cfg.patch_size}, "
                             f"width {cfg.hidden_size} by heads {cfg.num_heads}")
        self.grid = cfg.input_size // cfg.patch_size
        self.patchify = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        # Fixed (not learned), but kept in the state dict as the published checkpoints do.
        pos = sincos_2d(cfg.hidden_size, self.grid)[None]
        self.register_buffer("pos_embed", torch.as_tensor(pos, device=self.patchify.proj.weight.device))
        self.time_embed = TimestepEmbedder(cfg.hidden_size)
        self.label_embed = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout)
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for linear layers, N(0, 0.02) for embeddings; adaLN-Zero: modulation and output start at 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patchify.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) -> (N, C, H, W); each token's vector is laid out (row-in-patch, col-in-patch, channel)."""
        n, p, g, c = tokens.shape[0], self.config.patch_size, self.grid, self.config.out_channels
        x = tokens.reshape(n, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(x) + self.pos_embed
        c = self.time_embed(t) + self.label_embed(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final(tokens, c))


# Model sizes (paper Table 1) ---------------------------------------------------------------------

_SIZES = {  # name: (depth, hidden_size, heads)
    "Tiny": (4, 128, 4),  # the CPU demo size (not in the paper)
    "Mini": (6, 192, 6),  # 3x Tiny's parameters, 2.6x slower to sample: the next demo candidate (docs/dit.md)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _factory(size: str, patch: int):
    depth, hidden, heads = _SIZES[size]

    def build(**overrides) -> DiT:
        return DiT(DiTConfig(patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads, **overrides))

    build.__name__ = f"DiT_{size}_{patch}"
    build.__doc__ = f"DiT-{size}/{patch}: depth {depth}, width {hidden}, {heads} heads, patch {patch}."
    return build


DiT_XL_2, DiT_XL_4, DiT_XL_8 = (_factory("XL", p) for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (_factory("L", p) for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (_factory("B", p) for p in (2, 4, 8))
DiT_S_2, DiT_S_4, DiT_S_8 = (_factory("S", p) for p in (2, 4, 8))
# Patch 1 for the demo sizes only: on the demo autoencoder's 16x16 latents it gives the 256 tokens patch 2 gives on
# 32x32 pixels (docs/dit.md).
DiT_Mini_1, DiT_Mini_2, DiT_Mini_4, DiT_Mini_8 = (_factory("Mini", p) for p in (1, 2, 4, 8))
DiT_Tiny_1, DiT_Tiny_2, DiT_Tiny_4, DiT_Tiny_8 = (_factory("Tiny", p) for p in (1, 2, 4, 8))

DIT_MODELS = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-Mini/1": DiT_Mini_1, "DiT-Mini/2": DiT_Mini_2, "DiT-Mini/4": DiT_Mini_4, "DiT-Mini/8": DiT_Mini_8,
    "DiT-Tiny/1": DiT_Tiny_1, "DiT-Tiny/2": DiT_Tiny_2, "DiT-Tiny/4": DiT_Tiny_4, "DiT-Tiny/8": DiT_Tiny_8,
}


def build_dit(name: str, **overrides) -> DiT:
    """Build a registered size by name; `overrides` set DiTConfig fields (input_size, in_channels, …)."""
    if name not in DIT_MODELS:
        raise KeyError(f"unknown DiT model {name!r} (known: {', '.join(DIT_MODELS)})")
    return DIT_MODELS[name](**overrides)
