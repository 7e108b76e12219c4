"""Which demo-DiT recipe draws shapes the demo ViT recognises (the sweeps behind shapes-dit, docs/dit.md).

    python bench/dit_recipes.py NAME '{"batch_size": 256, "ema_decay": 0.999}' [--budget-s 420 | --steps N]
        [--processes 5] [--per-class 20] [--out DIR]

Trains `GPU_RECIPE` with the given overrides (any `DitRecipe` field) on the GPU when there is one, saves the
EMA weights as OUT/w_NAME.safetensors, then generates `--per-class` images per class (seeds from (1001,
class, index)) at several guidance scales and DDIM steps and prints one `RESULT {json}` line: for each
setting, the share the shipped ViT classifies as the conditioning class, and the share with the right shape.

`--budget-s` gives every run the same wall clock instead of the same steps: the run measures its own steps/s
(after all `--processes` side-by-side runs have rendered their data, so each measures under the same
contention) and sets `steps` to fill the budget; the recipe stored with the weights has that fixed number,
so `train_dit` reproduces it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from shardlight.models.sampler import DiTGenerator  # noqa: E402
from shardlight.training.dit_eval import agreement_by_setting  # noqa: E402
from shardlight.training.synthetic import CLASS_NAMES  # noqa: E402
from shardlight.training.train_dit import (  # noqa: E402
    GPU_RECIPE,
    device_name,
    save_dit,
    steps_per_second,
    train_dit,
)

SETTINGS = ((2.0, 25), (3.0, 25), (4.0, 25), (5.0, 25), (7.0, 25), (4.0, 50))  # (guidance, DDIM steps)


def wait_for_peers(barrier: Path, name: str, processes: int, timeout: float = 90.0) -> None:
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"ready_{name}").touch()
    start = time.time()
    while len(list(barrier.glob("ready_*"))) < processes and time.time() - start < timeout:
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("overrides", help="JSON object of DitRecipe fields to change from GPU_RECIPE")
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument("--budget-s", type=float, help="wall clock for this run (steps set from steps/s)")
    how_long.add_argument("--steps", type=int, help="train exactly this many steps")
    parser.add_argument("--processes", type=int, default=1, help="runs started side by side (for --budget-s)")
    parser.add_argument("--per-class", type=int, default=20, help="generated images per class for judging")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()

    start = time.time()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = replace(GPU_RECIPE, **json.loads(args.overrides))
    if args.steps:
        recipe = replace(recipe, steps=args.steps)
    elif args.budget_s:
        wait_for_peers(args.out / ".barrier", args.name, args.processes)
        rate = steps_per_second(recipe, device)
        render_s = 5 + recipe.train_per_class * len(CLASS_NAMES) / 2000  # rendering the training set runs at ~2,000 images/s
        left = args.budget_s - (time.time() - start) - render_s
        recipe = replace(recipe, steps=max(200, int(0.85 * rate * left)))
        print(f"{args.name}: {rate:.1f} steps/s -> {recipe.steps} steps", flush=True)
    trained = time.time()
    ema, log = train_dit(recipe, log_every=max(1, recipe.steps // 6), device=device)
    seconds = time.time() - trained
    weights = args.out / f"w_{args.name}.safetensors"
    save_dit(ema, weights, recipe, log, seconds, trained_on=device_name(torch.device(device)))
    result = {"name": args.name, "overrides": json.loads(args.overrides), "steps": recipe.steps,
              "train_s": round(seconds), "images_seen": recipe.steps * recipe.batch_size,
              "loss": [entry["loss"] for entry in log], "vit_says_target_and_shape": agreement_by_setting(
                  DiTGenerator(str(weights), device=device), SETTINGS, args.per_class, 1001, device)}
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
