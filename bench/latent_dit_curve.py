"""The latent demo DiT's learning curve on the CPU: train `train-demo-models --latent-dit`'s recipe with EMA
snapshots along the way, then judge each snapshot as issue 24 asks (docs/dit.md).

    python bench/latent_dit_curve.py train --out DIR [--models-dir configs/models] [--every 250]
        [--stop-after-s S] [--threads 1] [--overrides JSON]
    python bench/latent_dit_curve.py judge --out DIR [--per-class 20] [--seed 3003] [--dtype fp32]

train: the recipe is `demo_dit.demo_recipe(--models-dir, cpu, latent=True)` (with `--overrides`), its training
state kept where `train-demo-models MODELS_DIR --latent-dit` keeps it, so either resumes the other's run (same
recipe, same spelling of MODELS_DIR); every `--every` steps the EMA weights go to DIR/step-NNNNN.safetensors.
`--stop-after-s`: stop at the first checkpoint after that many seconds (the state stays, to resume).
The time to render and encode the training set is printed apart from the training steps.
judge: each snapshot not yet judged makes `--per-class` images per class at the shipped guidance and DDIM steps,
from seeds (--seed, class, index) that no card uses; the demo ViT says which class each is
(`dit_eval.agreement_by_setting`). One line per snapshot goes to DIR/curve.jsonl: step, images seen, training
loss, training minutes, recognised share, right-shape share.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import machine
from shardlight.models.device import pick_dtype
from shardlight.models.sampler import DiTGenerator
from shardlight.models.weights import read_weights_metadata
from shardlight.training.demo_dit import demo_recipe, state_file
from shardlight.training.dit_eval import agreement_by_setting
from shardlight.training.train_dit import TRAINING_PRECISIONS, save_dit, train_dit, training_set


class Stop(Exception):
    """The wall-clock budget is spent; raised at a checkpoint, after the state is saved."""


def train(args: argparse.Namespace) -> None:
    recipe = replace(demo_recipe(args.models_dir, torch.device("cpu"), latent=True), **json.loads(args.overrides))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    data = training_set(recipe)
    print(f"training set: {tuple(data[0].shape)} in {time.monotonic() - start:.0f} s", flush=True)

    def snapshot(step: int, ema: torch.nn.Module, log: list[dict]) -> None:
        minutes = log[-1]["minutes"] if log else 0.0
        save_dit(ema, args.out / f"step-{step:05d}.safetensors", recipe, log, minutes * 60)
        print(f"snapshot at step {step} ({minutes} training min)", flush=True)
        if args.stop_after_s and time.monotonic() - start > args.stop_after_s:
            raise Stop

    try:
        ema, log = train_dit(recipe, log_every=args.every, data=data, checkpoint=state_file(args.models_dir, recipe),
                             checkpoint_every=args.every, on_checkpoint=snapshot)
    except Stop:
        print(f"stopped; resume from {state_file(args.models_dir, recipe)}", flush=True)
        return
    save_dit(ema, args.out / f"step-{recipe.steps:05d}.safetensors", recipe, log, log[-1]["minutes"] * 60)


def judge(args: argparse.Namespace) -> None:
    curve = args.out / "curve.jsonl"
    done = {json.loads(line)["step"] for line in curve.read_text().splitlines()} if curve.is_file() else set()
    for path in sorted(args.out.glob("step-*.safetensors")):
        meta = read_weights_metadata(path)
        recipe, log = json.loads(meta["recipe"]), json.loads(meta["loss_log"])
        step = int(path.stem.split("-")[1])
        if step in done:
            continue
        start = time.monotonic()
        gen = DiTGenerator(str(path), dtype=pick_dtype(torch.device("cpu"), args.dtype))
        setting = (gen.default_guidance, gen.default_steps)
        right, shape = agreement_by_setting(gen, [setting], args.per_class, args.seed).popitem()[1]
        row = {"step": step, "images_seen": step * recipe["batch_size"], "loss": log[-1]["loss"] if log else None,
               "train_minutes": log[-1]["minutes"] if log else 0.0, "recognised": right, "right_shape": shape,
               "per_class": args.per_class, "seed": args.seed, "guidance": setting[0], "sample_steps": setting[1],
               "dtype": args.dtype,
               "judge_seconds": round(time.monotonic() - start)}
        print(json.dumps(row), flush=True)
        with curve.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["train", "judge"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models-dir", default="configs/models",
                        help="where the autoencoder is and the training state goes, spelled as for train-demo-models")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--stop-after-s", type=float, default=0.0)
    parser.add_argument("--overrides", default="{}", help="JSON: DitRecipe fields to change")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=3003)
    parser.add_argument("--dtype", choices=TRAINING_PRECISIONS, default="fp32",
                        help="judge: the denoiser's autocast dtype (bf16: large models on CPUs with AMX)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), f"{args.threads} torch thread(s)", flush=True)
    train(args) if args.mode == "train" else judge(args)


if __name__ == "__main__":
    main()
