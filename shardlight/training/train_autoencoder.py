"""Train the demo autoencoder (`shardlight.models.autoencoder`) on the synthetic shapes, judge its reconstructions
and write its weights and model card.

Training images are the demo's 64x64 JPEGs, decoded as the pipeline decodes them, each seen under one of the 8
symmetries of the square (the shapes data has them all: rotation is uniform, the anchors are symmetric). The loss
is L1 on pixels plus a small KL term and a scale-equivariance term (below). The first half of the steps sees
random crops aligned to the latent grid (the network is convolutional, and a quarter of the pixels is a quarter
of the cost); the second half sees whole images, so the GroupNorm statistics match what encoding a whole image
sees (the whole-image steps are what lifted the demo ViT's accuracy on reconstructions past 0.98: docs/dit.md).
The shift and scale of the latents are then measured on training images. Judged on held-out images (seed 1001):
PSNR per class, and the share of reconstructions the shipped demo ViT still labels correctly.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from shardlight.models.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_header, load_autoencoder
from shardlight.models.weights import read_weights_metadata
from shardlight.training import synthetic
from shardlight.training.demo_models import (
    decode,
    fmt_metric,
    fp16_state,
    held_out_samples,
    make_samples,
    metadata,
    warmup_cosine,
)

AE_NAME = "shapes-ae"
VIT_TARGET = 0.98  # share of reconstructed held-out images the demo ViT must still label correctly


@dataclass(frozen=True)
class AeRecipe:
    """Architecture, data and optimisation of the demo autoencoder; stored in its weights and card."""

    image_size: int = 64  # the demo JPEGs' side
    latent_channels: int = 4
    widths: tuple[int, ...] = (32, 64)  # two halvings: 64x64x3 -> 16x16x4
    stem_width: int = 16
    train_seed: int = 0  # synthetic data seed (the DiT's training images)
    init_seed: int = 0  # torch seed for init, batches, symmetries, crops and posterior noise
    train_per_class: int = 500
    steps: int = 8000
    batch_size: int = 32
    crop: int = 32  # side of the training crops (aligned to the latent grid)
    whole_image_steps: int = 4000  # the last steps train on whole images
    lr: float = 2e-3  # AdamW, linear warm-up then cosine decay to 10%
    warmup_steps: int = 50
    kl_weight: float = 1e-4  # on the mean KL per latent element; L1 is the mean per pixel channel
    # Scale equivariance (Skorokhodov et al. 2025): weight of L1(decoder(avgpool2 z), avgpool2 x), the half-size
    # image from the half-size latent, which moves the latents' variance into their coarse band (docs/dit.md)
    scale_equivariance: float = 1.0
    scale_images: int = 4096  # training images whose latents set the shift and scale
    threads: int = 2
    eval_seed: int = 1001
    eval_per_class: int = 20

    def config(self) -> AutoencoderConfig:
        return AutoencoderConfig(self.image_size, self.latent_channels, tuple(self.widths), self.stem_width)


def quick_recipe(recipe: AeRecipe) -> AeRecipe:
    """A smoke-test recipe: the same code path in seconds; the model will not be usable."""
    return replace(recipe, train_per_class=2, steps=4, whole_image_steps=2, batch_size=8, warmup_steps=1,
                   scale_images=48, eval_per_class=1)


# Data --------------------------------------------------------------------------------------------

def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> (N, 3, H, W) uint8 (a quarter of float32's memory for the whole training set)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


def to_images(x: torch.Tensor) -> list[Image.Image]:
    arrays = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def symmetry(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the square's 8 symmetries (k = 0 is the identity; 4..7 are mirrored)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def training_images(recipe: AeRecipe) -> torch.Tensor:
    samples = make_samples(recipe.train_seed, recipe.train_per_class)
    return to_uint8([decode(s) for s in samples])


def _batch(pixels: torch.Tensor, recipe: AeRecipe, step: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(pixels), (recipe.batch_size,), generator=gen)
    ks = torch.randint(0, 8, (recipe.batch_size,), generator=gen).tolist()
    x = torch.stack([symmetry(to_unit(pixels[i]), k) for i, k in zip(idx.tolist(), ks)])
    if step >= recipe.steps - recipe.whole_image_steps or recipe.crop >= recipe.image_size:
        return x
    cells = (recipe.image_size - recipe.crop) // recipe.config().factor + 1
    top, left = (torch.randint(0, cells, (2,), generator=gen) * recipe.config().factor).tolist()
    return x[:, :, top:top + recipe.crop, left:left + recipe.crop]


# Training ----------------------------------------------------------------------------------------

def autoencoder_loss(model: Autoencoder, x: torch.Tensor, recipe: AeRecipe, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the loss to minimise, its reconstruction L1, its KL) for one batch of pixels in [-1, 1]."""
    reconstruction, kl, z = model(x, gen)
    l1 = (reconstruction - x).abs().mean()
    loss = l1 + recipe.kl_weight * kl
    if recipe.scale_equivariance:
        half = model.decoder(F.avg_pool2d(z, 2))
        loss = loss + recipe.scale_equivariance * (half - F.avg_pool2d(x, 2)).abs().mean()
    return loss, l1, kl


def train_autoencoder(recipe: AeRecipe, log_every: int | None = None) -> tuple[Autoencoder, list[dict]]:
    """The training loop, then the latent shift and scale; returns the model (eval mode) and a loss log."""
    log_every = log_every or max(1, recipe.steps // 25)
    pixels = training_images(recipe)
    torch.manual_seed(recipe.init_seed)
    model = Autoencoder(recipe.config())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, recipe.warmup_steps, recipe.steps, floor=0.1))
    gen = torch.Generator().manual_seed(recipe.init_seed)
    log, running, start = [], 0.0, time.monotonic()
    model.train()
    for step in range(recipe.steps):
        x = _batch(pixels, recipe, step, gen)
        loss, l1, kl = autoencoder_loss(model, x, recipe, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += l1.item()
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            n = step % log_every + 1
            log.append({"step": step + 1, "l1": round(running / n, 4), "kl": round(kl.item(), 3),
                        "minutes": round((time.monotonic() - start) / 60, 2)})
            print(f"{AE_NAME} step {step + 1}/{recipe.steps}: L1 {running / n:.4f}, KL {kl.item():.3f} "
                  f"({log[-1]['minutes']} min)", flush=True)
            running = 0.0
    model.eval()
    with torch.no_grad():
        means = torch.cat([model.encoder(to_unit(pixels[i:i + 256]))[0] for i in range(0, recipe.scale_images, 256)])
    model.set_latent_scale(means)
    return model.requires_grad_(False), log


# Judging -----------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(model: Autoencoder, images: list[Image.Image]) -> list[Image.Image]:
    pixels = to_unit(to_uint8(images))
    return to_images(torch.cat([model.decode(model.encode(pixels[i:i + 128])) for i in range(0, len(pixels), 128)]))


def psnr(a: list[Image.Image], b: list[Image.Image]) -> np.ndarray:
    """Per-image PSNR in dB (8-bit pixels)."""
    x, y = to_uint8(a).float(), to_uint8(b).float()
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return (10 * torch.log10(255.0 ** 2 / mse)).numpy()


def evaluate_autoencoder(model: Autoencoder, recipe: AeRecipe) -> dict:
    """PSNR per class and the demo ViT's accuracy on reconstructions of held-out images (and on the originals)."""
    from shardlight.training.dit_eval import vit_accuracy

    held_out = held_out_samples(recipe.eval_seed, recipe.eval_per_class)
    real, labels = [decode(s) for s in held_out], [metadata(s)["label_id"] for s in held_out]
    rebuilt = reconstruct(model, real)
    db = psnr(real, rebuilt)
    per_class = {name: float(db[np.array(labels) == c].mean()) for c, name in enumerate(synthetic.CLASS_NAMES)
                 if c in labels}
    names = list(synthetic.CLASS_NAMES)
    vit = vit_accuracy(rebuilt, labels, names) or {}
    return {"eval_images": len(real), "psnr_mean": float(db.mean()), "psnr_worst_class": min(per_class.values()),
            "vit_accuracy_reconstructed": vit.get("vit_accuracy"),
            "vit_accuracy_original": (vit_accuracy(real, labels, names) or {}).get("vit_accuracy"),
            "vit_accuracy_reconstructed_worst_class": vit.get("vit_accuracy_worst_class"),
            "latent_shift": float(model.shift), "latent_scale": float(model.scale), "psnr_per_class": per_class,
            "vit_accuracy_reconstructed_per_class": vit.get("vit_accuracy_per_class", {})}


# Outputs -----------------------------------------------------------------------------------------

def save_autoencoder(model: Autoencoder, path: Path, recipe: AeRecipe, log: list[dict], seconds: float,
                     trained_on: str | None = None) -> None:
    """fp16 safetensors; the header has the architecture, the digest a latent DiT records, and the recipe."""
    state = fp16_state(model)
    meta = {**autoencoder_header(model, state), "recipe": json.dumps(asdict(recipe)), "loss_log": json.dumps(log),
            "train_seconds": f"{seconds:.0f}", "trained_on": trained_on or f"CPU, {torch.get_num_threads()} thread(s)",
            "software": f"python {platform.python_version()}, torch {torch.__version__}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def train_demo_autoencoder(out_dir: str | Path, quick: bool = False) -> dict:
    """Train on the CPU, write `shapes-ae.safetensors`, judge the file as the sampler loads it, write the card."""
    recipe = quick_recipe(AeRecipe()) if quick else AeRecipe()
    torch.set_num_threads(recipe.threads)
    start = time.monotonic()
    model, log = train_autoencoder(recipe)
    seconds = time.monotonic() - start
    path = Path(out_dir) / f"{AE_NAME}.safetensors"
    save_autoencoder(model, path, recipe, log, seconds)
    metrics = evaluate_autoencoder(load_autoencoder(str(path)), recipe)
    write_autoencoder_card(path.with_suffix(".md"), path, metrics)
    return {**metrics, "train_seconds": round(seconds, 1), "weights": str(path)}


def write_autoencoder_card(path: Path, weights: Path, metrics: dict) -> None:
    """The markdown model card: architecture, data, hyper-parameters, time and measured reconstructions."""
    meta = read_weights_metadata(weights)
    recipe, config = json.loads(meta["recipe"]), json.loads(meta["autoencoder_config"])
    side = config["image_size"] // 2 ** len(config["widths"])
    headline = {k: v for k, v in metrics.items() if not k.endswith("per_class")}
    vit = metrics.get("vit_accuracy_reconstructed_per_class") or {}
    met = (metrics.get("vit_accuracy_reconstructed") or 0) >= VIT_TARGET
    lines = [
        f"# {AE_NAME}: the latent space of the latent demo DiT", "",
        f"A small convolutional autoencoder (`shardlight/models/autoencoder.py`): {config['image_size']}x"
        f"{config['image_size']}x3 pixels ↔ {side}x{side}x{config['latent_channels']} latents, SD-VAE-like blocks "
        f"(widths {config['widths']}, decoder head {config['stem_width']}), KL-regularised posterior; encoding takes "
        f"the posterior mean, shifted by {metrics['latent_shift']:.4f} and scaled by {metrics['latent_scale']:.4f} "
        f"(measured on {recipe['scale_images']} training images) to unit variance. Weights: fp16, "
        f"{weights.stat().st_size / 1e6:.2f} MB; `weights_sha256` {meta['weights_sha256'][:16]}… is what a latent "
        "DiT records to refuse any other autoencoder.", "",
        "## Data",
        f"`shardlight/training/synthetic.py` demo images, {recipe['train_per_class']} per class, seed "
        f"{recipe['train_seed']}, under the 8 symmetries of the square; {recipe['crop']}px crops, whole images for "
        f"the last {recipe['whole_image_steps']} steps. Judged on held-out images (seed {recipe['eval_seed']}, "
        f"{recipe['eval_per_class']} per class).", "",
        "## Hyper-parameters", "", "| name | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in recipe.items()], "",
        "## Measured", "", "| metric | value |", "|---|---|", *[f"| {k} | {fmt_metric(v)} |" for k, v in headline.items()], "",
        f"Target: the demo ViT labels ≥ {VIT_TARGET} of the reconstructions correctly — {'met' if met else '**not met**'}.", "",
        "Per class: PSNR of the reconstructions (dB) and the share the demo ViT labels correctly:", "",
        "| class | PSNR | ViT |", "|---|---|---|",
        *[f"| {k} | {v:.2f} | {fmt_metric(vit.get(k))} |" for k, v in metrics["psnr_per_class"].items()], "",
        "Training L1 (step: mean since the previous entry): "
        + ", ".join(f"{e['step']}: {e['l1']}" for e in json.loads(meta["loss_log"])), "",
        f"Training time: {float(meta['train_seconds']) / 60:.1f} min on {meta['trained_on']} ({meta['software']}).", "",
        "## Reproduce", "", "```", "shardlight train-demo-models configs/models --no-vit --no-clip --no-dit", "```", "",
    ]
    path.write_text("\n".join(lines))
