"""Which DiT size and patch for the autoencoder's latents: CPU cost per training step and per generated image,
as ratios of the shipped pixel model's architecture (DiT-Tiny/2 on 32x32x3) measured in the same run, and
optionally the training loss each reaches after the same number of steps on the real latents.

    python bench/latent_dit_sizes.py [--models DiT-Tiny/2 DiT-Mini/2 DiT-Mini/4] [--rounds 3]
        [--loss-steps 300] [--threads 1]

Costs: rounds alternate between the candidates (median of `--rounds`, spread printed); a training step is
`train_dit`'s (loss, backward, AdamW) on a batch of 64, a generated image is DDIM with the
recipe's steps and guidance, plus the autoencoder's decode for latent models. Random weights: the cost does
not depend on them. `--loss-steps`: each candidate trains `LATENT_RECIPE` (with that size, that many steps,
the same data and seed) and reports the mean loss of its last tenth of steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import machine
from shardlight.models.autoencoder import load_autoencoder
from shardlight.models.diffusion import Diffusion, seeded_noise
from shardlight.training.train_dit import GPU_RECIPE, LATENT_RECIPE, DitRecipe, build_demo_model, steps_per_second, train_dit

BATCH = 64  # every candidate's training step is timed on the same batch size


def images_per_second(recipe: DitRecipe, images: int = 24) -> float:
    """Generation rate on the CPU: seeded noise, DDIM with guidance, decode (latent models)."""
    model = build_demo_model(recipe).eval()
    diffusion = Diffusion(recipe.schedule, recipe.diffusion_steps, recipe.prediction)
    decoder = load_autoencoder(recipe.autoencoder) if recipe.autoencoder else None
    noise = seeded_noise(list(range(images)), (recipe.in_channels, recipe.model_size, recipe.model_size))
    labels = torch.arange(images) % model.config.num_classes
    start = time.perf_counter()
    with torch.inference_mode():
        x = diffusion.sample(model, noise, labels, recipe.sample_steps, recipe.guidance, clip=decoder is None)
        if decoder is not None:
            decoder.decode(x)
    return images / (time.perf_counter() - start)


def candidates(names: list[str], autoencoder: str) -> dict[str, DitRecipe]:
    recipes = {f"pixel {GPU_RECIPE.model} (shipped)": GPU_RECIPE}
    recipes.update({f"latent {name}": replace(LATENT_RECIPE, model=name, autoencoder=autoencoder) for name in names})
    return recipes


def measure_costs(recipes: dict[str, DitRecipe], rounds: int) -> None:
    steps, gens = {name: [] for name in recipes}, {name: [] for name in recipes}
    for _ in range(rounds):  # interleaved: every candidate once per round, so load changes hit all alike
        for name, recipe in recipes.items():
            steps[name].append(steps_per_second(replace(recipe, batch_size=BATCH), "cpu", timed=10))
            gens[name].append(images_per_second(recipe))
    base_step, base_gen = (statistics.median(v[next(iter(recipes))]) for v in (steps, gens))
    print(f"{'model':<34}{'steps/s':>8}{'ratio':>7}{'spread':>8}{'img/s':>8}{'ratio':>7}{'spread':>8}")
    for name in recipes:
        step, gen = statistics.median(steps[name]), statistics.median(gens[name])
        print(f"{name:<34}{step:>8.3f}{step / base_step:>7.2f}{_spread(steps[name]):>8}"
              f"{gen:>8.2f}{gen / base_gen:>7.2f}{_spread(gens[name]):>8}")
    print(f"(steps/s at batch {BATCH}; ratios > 1 are faster than the shipped pixel model's)")


def _spread(values: list[float]) -> str:
    return f"±{(max(values) - min(values)) / 2 / statistics.median(values):.0%}"


def measure_loss(recipes: dict[str, DitRecipe], loss_steps: int) -> None:
    for name, recipe in recipes.items():
        if recipe.autoencoder is None:
            continue
        recipe = replace(recipe, steps=loss_steps, warmup_steps=min(100, loss_steps // 10))
        start = time.perf_counter()
        _, log = train_dit(recipe, log_every=max(1, loss_steps // 10))
        print(f"{name}: loss after {loss_steps} steps {log[-1]['loss']:.4f} ({time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-Tiny/2", "DiT-Mini/2", "DiT-Mini/4", "DiT-S/4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loss-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--autoencoder", default=LATENT_RECIPE.autoencoder, help="name or file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), f"{args.threads} torch thread(s)")
    recipes = candidates(args.models, args.autoencoder)
    measure_costs(recipes, args.rounds)
    if args.loss_steps:
        measure_loss(recipes, args.loss_steps)


if __name__ == "__main__":
    main()
