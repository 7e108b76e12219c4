"""Train, judge and card the demo DiT: what `shardlight train-demo-models` runs for the DiT.

Training (`train_dit`) and judging (`dit_eval`) never import each other; this module puts them in order.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from shardlight.models.device import pick_device
from shardlight.training.dit_eval import evaluate_dit, write_dit_card
from shardlight.training.train_dit import (
    DIT_NAME,
    GPU_RECIPE,
    DitRecipe,
    device_name,
    quick_recipe,
    save_dit,
    train_dit,
)


def train_demo_dit(out_dir: str | Path, quick: bool = False, device: str = "auto") -> dict:
    """Train the demo DiT, evaluate it with the shipped ViT/CLIP, write weights and model card.

    Args:
        out_dir: folder for `shapes-dit.safetensors` and `shapes-dit.md` (configs/models for the shipped one).
        quick: a few steps on a handful of images (smoke test); the model will not be usable.
        device: "auto" trains `GPU_RECIPE` on a CUDA GPU when there is one, else the CPU recipe; "cpu" or
            "cuda" choose.

    Returns:
        The measured metrics plus `train_seconds` and `weights` (the file written).
    """
    device = pick_device(device)
    recipe = GPU_RECIPE if device.type == "cuda" else DitRecipe()
    recipe = quick_recipe(recipe) if quick else recipe
    torch.set_num_threads(recipe.threads)
    out = Path(out_dir)
    start = time.monotonic()
    ema, log = train_dit(recipe, device=device)
    seconds = time.monotonic() - start
    path = out / f"{DIT_NAME}.safetensors"
    save_dit(ema, path, recipe, log, seconds, trained_on=device_name(device))
    return finish_card(path, out, device)


def finish_card(path: Path, out: Path, device: torch.device | str = "cpu") -> dict:
    """Evaluate the written weights (loaded as the augmenter loads them) and write the model card."""
    metrics = evaluate_dit(path, device)
    write_dit_card(out / f"{DIT_NAME}.md", path, metrics)
    return {**metrics, "weights": str(path)}
