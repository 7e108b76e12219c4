"""Train the latent demo DiT for a fixed wall clock and judge it beside the shipped pixel DiT (docs/dit.md).

    python bench/latent_dit_gpu.py --out OUT --budget-s 200 [--steps N] [--autoencoder FILE]
        [--baseline configs/models/shapes-dit.safetensors] [--overrides JSON] [--seed 2002] [--per-class 20]

On the GPU when there is one, else on the CPU (`--steps 20` is a smoke run there). In order:
1. the training set: the demo images rendered and encoded by the autoencoder (timed, inside the budget);
2. with `--budget-s`, the recipe's steps/s is measured and `steps` set so that training fills what is left of
   the budget; the recipe stored with the weights has that fixed number, so `train_dit` reproduces it;
3. `LATENT_RECIPE` (with `--overrides`) trained; OUT/shapes-latent-dit.safetensors and its card written, the
   autoencoder copied beside it so that OUT loads on its own;
4. the new model and the baseline judged alike by `dit_eval.evaluate_dit` (`--per-class` images per class from
   seeds (--seed, class, index): the demo ViT, the reference CNN, CLIP-FD to held-out real images), the new
   model's ViT agreement at other guidance scales, and OUT/latent-vs-pixel.png: per class, held-out real
   images, then the latent model's, then the pixel model's.
Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from flows.report.preview import contact_sheet
from shardlight.models.autoencoder import autoencoder_file
from shardlight.models.sampler import DiTGenerator
from shardlight.models.weights import MODEL_DIR
from shardlight.training.demo_models import decode, held_out_samples, metadata
from shardlight.training.dit_eval import agreement_by_setting, evaluate_dit, generate_per_class, write_dit_card
from shardlight.training.train_dit import (
    LATENT_DIT_NAME,
    LATENT_RECIPE,
    device_name,
    save_dit,
    steps_per_second,
    train_dit,
    training_set,
)

HEADLINE = ("vit_accuracy", "vit_accuracy_worst_class", "reference_cnn_accuracy", "clip_fd",
            "clip_fd_untrained", "clip_fd_real_at_model_size", "clip_score_mean", "eval_seconds")
SWEEP = [(2.0, 25), (3.0, 25), (5.0, 25), (7.0, 25)]  # (guidance, DDIM steps) besides the shipped 4.0, 25


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    how_long = parser.add_mutually_exclusive_group(required=True)
    how_long.add_argument("--budget-s", type=float, help="wall clock for data + training (steps set from steps/s)")
    how_long.add_argument("--steps", type=int, help="train exactly this many steps")
    parser.add_argument("--autoencoder", default=str(MODEL_DIR / "shapes-ae.safetensors"))
    parser.add_argument("--baseline", type=Path, default=MODEL_DIR / "shapes-dit.safetensors",
                        help="the pixel DiT judged beside it (skipped when the file is missing)")
    parser.add_argument("--overrides", default="{}", help="JSON object of DitRecipe fields to change")
    parser.add_argument("--seed", type=int, default=2002, help="judging seeds: generation and held-out real images")
    parser.add_argument("--per-class", type=int, default=20, help="generated images per class for judging")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def train(args: argparse.Namespace, device: torch.device, start: float) -> tuple[Path, dict]:
    """Steps 1-3: data, step count, training, weights (+ the autoencoder beside them)."""
    recipe = replace(LATENT_RECIPE, autoencoder=args.autoencoder, **json.loads(args.overrides))
    data = training_set(recipe, device)
    prepared = time.monotonic()
    if args.steps:
        recipe = replace(recipe, steps=args.steps)
    else:
        rate = steps_per_second(recipe, device)
        left = args.budget_s - (time.monotonic() - start)
        recipe = replace(recipe, steps=max(100, int(0.97 * rate * left)))
        print(f"{rate:.1f} steps/s -> {recipe.steps} steps", flush=True)
    began = time.monotonic()
    ema, log = train_dit(recipe, log_every=max(1, recipe.steps // 10), device=device, data=data)
    seconds = time.monotonic() - began
    args.out.mkdir(parents=True, exist_ok=True)
    autoencoder = autoencoder_file(args.autoencoder)
    if autoencoder.resolve() != (args.out / autoencoder.name).resolve():
        shutil.copy(autoencoder, args.out / autoencoder.name)
    weights = args.out / f"{LATENT_DIT_NAME}.safetensors"
    save_dit(ema, weights, recipe, log, seconds, trained_on=device_name(device))
    return weights, {"steps": recipe.steps, "batch_size": recipe.batch_size, "model": recipe.model,
                     "data_s": round(prepared - start, 1), "train_s": round(seconds, 1),
                     "loss": [entry["loss"] for entry in log]}


def sheet(args: argparse.Namespace, models: list[Path], device: torch.device, per_model: int = 4) -> Path:
    """Per class: `per_model` held-out real images (framed), then `per_model` from each model."""
    held_out = held_out_samples(args.seed, per_model)
    generators = [DiTGenerator(str(m), device=device) for m in models]
    generated = [generate_per_class(gen, per_model, args.seed) for gen in generators]
    rows = {}
    for c, name in enumerate(generators[0].class_names):
        real = [(decode(s), "source") for s in held_out if metadata(s)["label_id"] == c]
        rows[name] = real + [(im, "gen") for images, labels in generated for im, y in zip(images, labels) if y == c]
    return contact_sheet(rows, args.out / "latent-vs-pixel.png", max_per_row=per_model * (1 + len(models)))


def main() -> None:
    args = parse()
    start = time.monotonic()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights, result = train(args, device, start)
    metrics = evaluate_dit(weights, device, seed=args.seed, per_class=args.per_class)
    write_dit_card(weights.with_suffix(".md"), weights, metrics)
    result["latent"] = {k: metrics.get(k) for k in HEADLINE}
    result["latent_sweep_vit_and_shape"] = agreement_by_setting(DiTGenerator(str(weights), device=device), SWEEP,
                                                                args.per_class, args.seed, device)
    models = [weights]
    if args.baseline.is_file():
        baseline = evaluate_dit(args.baseline, device, seed=args.seed, per_class=args.per_class)
        result["pixel_baseline"] = {k: baseline.get(k) for k in HEADLINE}
        models.append(args.baseline)
    result["sheet"] = str(sheet(args, models, device))
    result.update(device=device_name(device), seed=args.seed, per_class=args.per_class,
                  total_s=round(time.monotonic() - start, 1))
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
