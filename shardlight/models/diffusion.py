"""Gaussian diffusion for DiT: β schedules, the noise-prediction loss and a deterministic DDIM sampler.

Forward process (Ho et al. 2020): x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε. The model learns ε from (x_t, t, y).
Sampling uses DDIM with η = 0 (Song et al. 2021), so the image depends only on the starting noise: one
seed, one image, whatever the number of images in the batch. Classifier-free guidance (Ho & Salimans
2021) mixes the conditional and null-class predictions: ε = ε_∅ + s · (ε_y - ε_∅); a model may name, per class,
classes to steer away from instead (`negatives`): ε = ε̄_neg + s · (ε_y - ε̄_neg), ε̄_neg their mean prediction.
`vary` is SDEdit (Meng et al. 2022): noise a clean image to a strength, then denoise it under a label.
The loss may weigh each position by how much x_0 changes around it (`outline_weight`): the outlines, where a
denoiser of shapes goes wrong, count more than flat regions; the weights average 1 per image.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Schedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "v"]


def make_betas(schedule: Schedule, steps: int = 1000) -> torch.Tensor:
    """β_1..β_T: linear 1e-4→0.02 (scaled to T, as in DDPM/DiT) or cosine (Nichol & Dhariwal 2021)."""
    if schedule == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        t = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r} (linear or cosine)")


class Diffusion:
    """One noise schedule and output parameterisation; the training loss and the samplers share them.

    prediction "eps": the network outputs ε (the published DiT models). "v": it outputs
    v = √ᾱ ε − √(1-ᾱ) x_0 (Salimans & Ho 2022) and ε = √(1-ᾱ) x_t + √ᾱ v — the ε the sampler uses is then
    exact at low signal-to-noise, where a tiny network cannot learn the identity map x_t → ε precisely
    enough (its error is amplified by 1/√ᾱ in the x_0 estimate). The demo DiT uses "v".
    """

    def __init__(self, schedule: Schedule = "linear", steps: int = 1000, prediction: Prediction = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r} (eps or v)")
        self.schedule, self.num_steps, self.prediction = schedule, steps, prediction
        self.alpha_bar = torch.cumprod(1 - make_betas(schedule, steps), dim=0)  # float64, (T,)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0)."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_loss(self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                      min_snr_gamma: float | None = None, outline_weight: float = 0.0) -> torch.Tensor:
        """Simple DDPM objective at a uniform random timestep: MSE on ε (or on v, its reparameterisation).

        `min_snr_gamma` weights each sample as Min-SNR-γ does (Hang et al. 2023): the loss measured on x₀ is
        weighted by min(SNR, γ), so the many nearly-noiseless timesteps stop dominating the gradient.
        `outline_weight` λ > 0 weights each position's error by `outline_weights(x0, λ)`.
        """
        # Drawn on the CPU generator and moved: the same draws whichever device trains.
        t = torch.randint(0, self.num_steps, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, dtype=x0.dtype, generator=generator).to(x0.device)
        pred = model(self.add_noise(x0, t, noise), t, y)[:, : x0.shape[1]]  # the ε half when Σ is learned
        ab = self._ab(t, x0)
        target = noise if self.prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        error = (pred.float() - target) ** 2
        if outline_weight:
            error = error * outline_weights(x0, outline_weight)
        per_sample = error.mean(dim=tuple(range(1, x0.ndim)))
        if min_snr_gamma is None:
            return per_sample.mean()
        # Both losses are the x₀ error times a factor of the SNR: ε-loss = x₀-loss · SNR, v-loss = x₀-loss · (SNR+1).
        snr = (ab / (1 - ab)).flatten()
        if self.prediction == "eps":
            weight = (min_snr_gamma / snr).clamp(max=1.0)
        else:
            weight = snr.clamp(max=min_snr_gamma) / (snr + 1)
        return (weight * per_sample).mean()

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """The network's output as ε."""
        if self.prediction == "eps":
            return out
        ab = float(self.alpha_bar[t])
        return math.sqrt(1 - ab) * x + math.sqrt(ab) * out

    def timesteps(self, steps: int, start: int | None = None) -> list[int]:
        """`steps` evenly spaced timesteps from `start` (default T-1) down to 0."""
        start = self.num_steps - 1 if start is None else start
        steps = max(1, min(steps, start + 1))
        return sorted({round(start * i / max(steps - 1, 1)) for i in range(steps)}, reverse=True)

    def predict_noise(self, model, x: torch.Tensor, t: int, y: torch.Tensor, guidance: float,
                      negatives: torch.Tensor | None = None) -> torch.Tensor:
        """ε for a batch at timestep t; guidance ≠ 1 steers from a base prediction to the conditional one, in one
        batched call: the null class's prediction (classifier-free guidance), or with `negatives` ((N, k) class
        ids) the mean of the conditional predictions for those classes (guidance away from them)."""
        channels = x.shape[1]
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if guidance == 1.0:
            return self.to_eps(model(x, tt, y)[:, :channels].float(), x, t)
        if negatives is None:
            negatives = torch.full_like(y, model.label_embed.null_class)[:, None]
        passes = 1 + negatives.shape[1]
        labels = torch.cat([y, *negatives.T])
        out = model(torch.cat([x] * passes), torch.cat([tt] * passes), labels)[:, :channels].float()
        cond, *bases = out.chunk(passes)  # guidance on v equals guidance on ε: ε is affine in v for fixed x_t
        base = bases[0] if len(bases) == 1 else torch.stack(bases).mean(0)
        return self.to_eps(base + guidance * (cond - base), x, t)

    @torch.no_grad()
    def ddim(self, model, x: torch.Tensor, y: torch.Tensor, steps: int = 25, guidance: float = 1.0,
             start: int | None = None, clip: bool = False, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic DDIM (η = 0) from x at timestep `start` (default T-1) to a clean x_0.

        `clip` clamps each x_0 estimate to [-1, 1] (pixel-space models); `negatives`: see `predict_noise`.
        """
        schedule = self.timesteps(steps, start)
        for i, t in enumerate(schedule):
            eps = self.predict_noise(model, x, t, y, guidance, negatives)
            ab = float(self.alpha_bar[t])
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            if clip:
                x0 = x0.clamp(-1, 1)
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            ab_prev = float(self.alpha_bar[schedule[i + 1]]) if i + 1 < len(schedule) else 1.0
            x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        return x

    def sample(self, model, noise: torch.Tensor, y: torch.Tensor, steps: int = 25, guidance: float = 1.0,
               clip: bool = False, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """Generate from pure noise x_T (draw it per image from a seeded generator, see `seeded_noise`)."""
        return self.ddim(model, noise, y, steps, guidance, clip=clip, negatives=negatives)

    def vary(self, model, x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, strength: float,
             steps: int = 25, guidance: float = 1.0, clip: bool = False,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit: noise x0 to t = strength·T, then denoise under label y with ~strength·steps DDIM steps.

        strength near 0 returns (almost) the input; 1 ignores it. The layout of the source survives
        for middle strengths because the coarse structure is still present in x_t.
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        start = max(1, round(strength * (self.num_steps - 1)))
        t = torch.full((x0.shape[0],), start, device=x0.device, dtype=torch.long)
        x = self.add_noise(x0, t, noise)
        return self.ddim(model, x, y, max(1, round(steps * strength)), guidance, start=start, clip=clip,
                         negatives=negatives)


def outline_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """(N, 1, H, W) weights (1 + λ·e/ē) / (1 + λ), mean 1 per image: e is x0's local change (|Δx| + |Δy| to the
    next position, channel mean, the largest within 3×3 so both sides of an edge count), ē its image mean. A
    flat image weighs every position 1."""
    x0 = x0.float()
    dy = F.pad((x0[:, :, 1:] - x0[:, :, :-1]).abs(), (0, 0, 0, 1))
    dx = F.pad((x0[:, :, :, 1:] - x0[:, :, :, :-1]).abs(), (0, 1, 0, 0))
    change = F.max_pool2d((dx + dy).mean(1, keepdim=True), 3, stride=1, padding=1)
    mean = change.mean(dim=(1, 2, 3), keepdim=True)
    relative = torch.where(mean > 1e-6, change / mean.clamp(min=1e-6), torch.ones_like(change))
    return (1 + strength * relative) / (1 + strength)


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """One independent N(0, I) draw per seed, so an image does not depend on its batch neighbours."""
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device)
