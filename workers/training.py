"""Train the demo models on synthetic shapes: a small CLIP (open_clip) and a small ViT classifier (timm).

Both train on CPU in minutes from data regenerated with `workers.synthetic`, are evaluated on a pool made
with a seed never used in training, and are written as fp16 safetensors plus a model card each.
The shipped defaults in configs/models/ come from `train_demo_models("configs/models")`.
"""

from __future__ import annotations

import io
import json
import math
import platform
import random
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from workers import synthetic
from workers.config import ClipSpec, LabelSpec
from workers.models import ClipEmbedder, VitLabeler, register_repo_models

CLIP_NAME, VIT_NAME = "shapes-clip", "shapes-vit"
REPRODUCE = "shardlight train-demo-models OUT_DIR"


@dataclass(frozen=True)
class Recipe:
    """Data and optimisation settings for one model; stored in its weights and card."""

    train_seed: int = 0  # synthetic data seed for training images and captions
    eval_seed: int = 1001  # held-out pool seed: never used for training data
    init_seed: int = 0  # torch seed for weight init and batch order
    train_per_class: int = 500  # training images per class (24 classes)
    eval_per_class: int = 20  # held-out images per class
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak learning rate, after linear warm-up, cosine decay to 0
    warmup_steps: int = 100
    weight_decay: float = 0.1


CLIP_RECIPE = Recipe()
VIT_RECIPE = Recipe(train_per_class=300, epochs=6, weight_decay=0.05)


def _quick(recipe: Recipe) -> Recipe:
    """A smoke-test recipe: a few steps on a handful of images, same code path."""
    return replace(recipe, train_per_class=3, eval_per_class=2, epochs=1, batch_size=24, warmup_steps=1)


# Data --------------------------------------------------------------------------------------------

def make_samples(seed: int, per_class: int, templates: tuple[str, ...] = synthetic.TRAIN_TEMPLATES) -> list[dict]:
    """Class-balanced WebDataset-style samples (JPEG bytes + metadata), deterministic for `seed`."""
    rng = random.Random(f"demo-models-{seed}")
    n = per_class * len(synthetic.CLASS_NAMES)
    return [synthetic.sample(rng, f"{seed}-{i:06d}", label_id=i % len(synthetic.CLASS_NAMES), templates=templates)
            for i in range(n)]


def decode(sample: dict) -> Image.Image:
    """The JPEG as an RGB image, exactly as the pipeline's reader decodes it."""
    with Image.open(io.BytesIO(sample["jpg"])) as img:
        return img.convert("RGB")


def metadata(sample: dict) -> dict:
    return json.loads(sample["json"])


def to_pixels(samples: list[dict], transform) -> torch.Tensor:
    return torch.stack([transform(decode(s)) for s in samples])


def recaption(samples: list[dict], rng: random.Random) -> list[str]:
    """A fresh training caption per image, so each epoch sees other phrasings of the same scene."""
    scenes = [synthetic.Scene(rotation=0.0, **{k: m[k] for k in ("color", "shape", "size", "position", "background")})
              for m in map(metadata, samples)]
    return [synthetic.caption(scene, rng) for scene in scenes]


def class_prompt_templates() -> tuple[str, ...]:
    """Training and held-out phrasings that name only colour and shape, i.e. usable as class prompts."""
    def fields(template: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}

    return tuple(t for t in synthetic.TRAIN_TEMPLATES + synthetic.EVAL_TEMPLATES if fields(t) == {"color", "shape"})


# Optimisation ------------------------------------------------------------------------------------

def _optimizer(model: torch.nn.Module, recipe: Recipe, total_steps: int):
    """AdamW without decay on gains, biases and temperature; linear warm-up then cosine decay."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; the last partial batch is dropped so contrastive batches stay full."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _fit(model: torch.nn.Module, recipe: Recipe, n: int, loss_for, desc: str, after_step=None) -> None:
    """The shared loop: `loss_for(indices, epoch)` returns the loss of one batch."""
    generator = torch.Generator().manual_seed(recipe.init_seed)
    steps_per_epoch = n // recipe.batch_size
    opt, schedule = _optimizer(model, recipe, recipe.epochs * steps_per_epoch)
    model.train()
    for epoch in range(recipe.epochs):
        bar = tqdm(_batches(n, recipe.batch_size, generator), desc=f"{desc} epoch {epoch + 1}/{recipe.epochs}",
                   leave=False, mininterval=5)
        total = 0.0
        for idx in bar:
            loss = loss_for(idx, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if after_step:
                after_step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"{desc} epoch {epoch + 1}/{recipe.epochs}: mean loss {total / max(1, len(bar)):.4f}", flush=True)
    model.eval()


# Training ----------------------------------------------------------------------------------------

def train_clip(recipe: Recipe) -> ClipEmbedder:
    """CLIP contrastive training (learned temperature) on image-caption pairs, re-captioned every epoch."""
    from open_clip.loss import ClipLoss

    clip = ClipEmbedder(ClipSpec(model=CLIP_NAME, seed=recipe.init_seed), torch.device("cpu"))
    samples = make_samples(recipe.train_seed, recipe.train_per_class)
    print(f"{CLIP_NAME}: {len(samples)} training images (seed {recipe.train_seed})", flush=True)
    pixels = to_pixels(samples, clip.preprocess)
    captions = random.Random(f"captions-{recipe.train_seed}")
    tokens = [clip.tokenizer(recaption(samples, captions)) for _ in range(recipe.epochs)]
    model, loss_fn = clip.model, ClipLoss()

    def loss_for(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        out = model(pixels[idx], tokens[epoch][idx])
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def clamp_temperature() -> None:
        with torch.no_grad():  # as in CLIP: the logit scale may not exceed 100
            model.logit_scale.clamp_(0, math.log(100))

    model.output_dict = True
    _fit(model, recipe, len(samples), loss_for, CLIP_NAME, after_step=clamp_temperature)
    return clip


def train_vit(recipe: Recipe) -> VitLabeler:
    """Cross-entropy training of the ViT classifier, built exactly as the label stage builds it."""
    torch.manual_seed(recipe.init_seed)  # timm initialises from the global generator
    vit = VitLabeler(LabelSpec(kind="vit", model=VIT_NAME), torch.device("cpu"))
    if tuple(vit.class_names) != synthetic.CLASS_NAMES:
        raise ValueError(f"{VIT_NAME}.json class_names must equal workers.synthetic.CLASS_NAMES, in order")
    samples = make_samples(recipe.train_seed, recipe.train_per_class)
    print(f"{VIT_NAME}: {len(samples)} training images (seed {recipe.train_seed})", flush=True)
    pixels = to_pixels(samples, vit.transform)
    labels = torch.tensor([metadata(s)["label_id"] for s in samples])

    def loss_for(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.cross_entropy(vit.model(pixels[idx]), labels[idx], label_smoothing=0.1)

    _fit(vit.model, recipe, len(samples), loss_for, VIT_NAME)
    return vit
