"""Train, judge and card the demo DiT: what `shardlight train-demo-models` runs for the DiT.

Training (`train_dit`) and judging (`dit_eval`) never import each other; this module puts them in order.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from shardlight.models.device import pick_device
from shardlight.training.dit_eval import evaluate_dit, write_dit_card
from shardlight.training.train_dit import (
    GPU_RECIPE,
    LATENT_RECIPE,
    DitRecipe,
    device_name,
    dit_name,
    quick_recipe,
    save_dit,
    train_dit,
)


def train_demo_dit(out_dir: str | Path, quick: bool = False, device: str = "auto", latent: bool = False,
                   autoencoder: str | None = None, checkpoint_every: int = 250) -> dict:
    """Train the demo DiT, evaluate it with the shipped ViT/CLIP, write weights and model card.

    Args:
        out_dir: folder for the weights and card (`shapes-dit.*`, or `shapes-latent-dit.*` for the latent model;
            configs/models for the shipped ones).
        quick: a few steps on a handful of images (smoke test); the model will not be usable.
        device: "auto" trains on a CUDA GPU when there is one, else on the CPU; "cpu" or "cuda" choose. The
            pixel model's GPU recipe is larger than its CPU recipe; the latent model has one recipe.
        latent: train `LATENT_RECIPE` on the latents of the demo autoencoder instead of a pixel model.
        autoencoder: the autoencoder's name or file (default: the recipe's, found in out_dir, then configs/models).
        checkpoint_every: steps between saves of the training state to OUT_DIR/NAME.train-state.pt; a run started
            again with that file there resumes from it (the same recipe only), and the file is deleted at the end.

    Returns:
        The measured metrics plus `train_seconds` and `weights` (the file written).
    """
    device = pick_device(device)
    recipe = demo_recipe(out_dir, device, latent, autoencoder, quick)
    torch.set_num_threads(recipe.threads)
    path, state = Path(out_dir) / f"{dit_name(recipe)}.safetensors", state_file(out_dir, recipe)
    start = time.monotonic()
    ema, log = train_dit(recipe, device=device, checkpoint=state, checkpoint_every=checkpoint_every)
    # A resumed run's time is that of all its parts: the log's last entry counts them.
    seconds = max(time.monotonic() - start, log[-1]["minutes"] * 60 if log else 0.0)
    save_dit(ema, path, recipe, log, seconds, trained_on=device_name(device))
    state.unlink(missing_ok=True)
    return finish_card(path, device)


def demo_recipe(out_dir: str | Path, device: torch.device, latent: bool = False, autoencoder: str | None = None,
                quick: bool = False) -> DitRecipe:
    """The recipe `train_demo_dit` trains (see its arguments); shared with the bench scripts, so that a run they
    start is the same recipe and resumes from the same training state."""
    if latent:
        name = autoencoder or LATENT_RECIPE.autoencoder
        local = Path(out_dir) / f"{name}.safetensors"
        recipe = replace(LATENT_RECIPE, autoencoder=str(local) if local.is_file() else name)
    else:
        recipe = GPU_RECIPE if device.type == "cuda" else DitRecipe()
    return quick_recipe(recipe) if quick else recipe


def state_file(out_dir: str | Path, recipe: DitRecipe) -> Path:
    """Where a run of `recipe` into out_dir keeps its training state while it runs."""
    return Path(out_dir) / f"{dit_name(recipe)}.train-state.pt"


def finish_card(path: Path, device: torch.device | str = "cpu") -> dict:
    """Evaluate the written weights (loaded as the augmenter loads them) and write the model card beside them."""
    metrics = evaluate_dit(path, device)
    write_dit_card(path.with_suffix(".md"), path, metrics)
    return {**metrics, "weights": str(path)}
