"""Train the demo DiT: a tiny class-conditional diffusion transformer on synthetic shapes, in pixels or in the
latent space of the demo autoencoder (`shardlight.models.autoencoder`), as the paper builds it.

The same code trains on CPU or on a CUDA GPU; docs/dit.md records what each recipe costs and draws.
Pixel recipes: images rendered by `shardlight.training.synthetic` (64x64 JPEGs, exactly as the demo shards
hold them), reduced to 32x32 for the model. Latent recipes (`autoencoder` set): the 64x64 images and their
mirror images encoded once by the autoencoder; the DiT models its latent grid and the sampler decodes.
Either way the model learns to denoise under a cosine schedule, predicting v (from which the sampler
recovers ε exactly; see `shardlight.models.diffusion.Diffusion`).
The EMA weights are shipped as fp16 safetensors with their architecture, class names, schedule, codec and
recipe in the header, plus a model card with metrics measured by the shipped ViT and CLIP.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from shardlight.core.errors import InputError
from shardlight.models.autoencoder import autoencoder_file, load_autoencoder
from shardlight.models.device import autocast, pick_dtype
from shardlight.models.diffusion import Diffusion
from shardlight.models.dit import build_dit
from shardlight.models.sampler import PixelCodec
from shardlight.models.weights import read_weights_metadata
from shardlight.training import synthetic
from shardlight.training.demo_models import decode, fp16_state, make_samples, metadata, warmup_cosine

DIT_NAME = "shapes-dit"
LATENT_DIT_NAME = "shapes-latent-dit"


@dataclass(frozen=True)
class DitRecipe:
    """Data, model and optimisation settings of the demo DiT; stored in its weights and card.

    The defaults are the CPU recipe; `GPU_RECIPE` is what the shipped weights used (costs: docs/dit.md).
    """

    model: str = "DiT-Tiny/4"  # registry name (shardlight.models.dit.DIT_MODELS)
    model_size: int = 32  # side of the model's grid: pixels (64x64 demo images box-downsampled 2x) or latents
    image_size: int = 64  # pixels of the stored images (pixel models' output is bicubic-upsampled)
    autoencoder: str | None = None  # latent models: the autoencoder's name (configs/models/NAME.safetensors) or file
    in_channels: int = 3  # 3 for pixels; the autoencoder's latent channels for latent models
    schedule: str = "cosine"  # β schedule; cosine keeps more signal at small resolutions
    prediction: str = "v"  # network output: v (ε derived exactly at low SNR) rather than ε, see Diffusion
    diffusion_steps: int = 1000  # T
    train_seed: int = 0  # synthetic data seed for training images
    init_seed: int = 0  # torch seed for weight init, batch order, timesteps and noise
    train_per_class: int = 500  # training images per class (24 classes), rendered once
    steps: int = 7200  # optimizer steps
    batch_size: int = 32
    lr: float = 2e-3  # AdamW, linear warm-up then cosine decay to 10%
    warmup_steps: int = 100
    weight_decay: float = 0.0
    class_dropout: float = 0.1  # labels replaced by the null class, for classifier-free guidance
    ema_decay: float = 0.995  # EMA of the weights; the EMA copy is what ships
    min_snr_gamma: float | None = None  # Min-SNR-γ loss weighting (Hang et al. 2023); None: plain MSE
    outline_weight: float = 0.0  # λ: the loss weighs positions where x0 changes up to (1 + λ·e/ē) (diffusion.py)
    hflip: bool = True  # random horizontal flips (shape classes are mirror-invariant)
    threads: int = 2  # torch CPU threads
    precision: str = "fp32"  # "bf16": forward and loss under bf16 autocast; weights, optimizer and EMA stay fp32
    guidance: float = 4.0  # shipped classifier-free guidance scale
    guidance_negatives: str | None = None  # None: guide from the null class; a GUIDANCE_NEGATIVES name instead
    sample_steps: int = 25  # shipped DDIM steps
    eval_seed: int = 1001  # held-out real images and generation seeds for the metrics
    eval_per_class: int = 20  # generated (and real held-out) images per class for the metrics


# Patch 2 draws shapes better than patch 4 at several times the cost per step (the sweep: docs/dit.md).
GPU_RECIPE = DitRecipe(model="DiT-Tiny/2", steps=14400, batch_size=64)
# On the autoencoder's 16x16x4 latents, patch 2 gives 64 tokens: DiT-Tiny/2 steps 5x as fast as on pixels, so the
# shipped pixel model's steps and batch fit a CPU session (size, patch and cost measured: docs/dit.md).
# Its guidance steers away from the same colour's other shapes (4 passes a step instead of 2): 0.67 -> 0.77 of
# its images recognised on fresh seeds (docs/dit.md, "Guidance away from the other shapes"); its loss weighs the
# shapes' outlines (λ 2: the model those figures come from; with the plain loss 0.665).
LATENT_RECIPE = DitRecipe(model="DiT-Tiny/2", model_size=16, autoencoder="shapes-ae", in_channels=4, steps=14400,
                          batch_size=64, ema_decay=0.999, outline_weight=2.0, guidance=3.0,
                          guidance_negatives="other-shapes")
# Per class, the classes a model's guidance steers away from (written into its header, read by DiTGenerator).
GUIDANCE_NEGATIVES = {"other-shapes": synthetic.same_colour_other_shapes}


TRAINING_PRECISIONS = ("bf16", "fp32")  # explicit only: a recipe's numbers must not depend on the machine ("auto")


def training_dtype(recipe: DitRecipe, device: torch.device) -> torch.dtype:
    """The autocast dtype of the recipe's forward and loss; a one-line error for an unknown `precision`."""
    if recipe.precision not in TRAINING_PRECISIONS:
        raise InputError(f"DiT recipe: precision {recipe.precision!r} is not one of {list(TRAINING_PRECISIONS)}")
    return pick_dtype(device, recipe.precision)


def quick_recipe(recipe: DitRecipe) -> DitRecipe:
    """A smoke-test recipe: the same code path in seconds; the model will not be usable."""
    return replace(recipe, train_per_class=2, steps=3, batch_size=8, warmup_steps=1, eval_per_class=2,
                   sample_steps=3)


# Data --------------------------------------------------------------------------------------------

def training_images(recipe: DitRecipe) -> tuple[list[Image.Image], torch.Tensor]:
    """Class-balanced demo images (decoded JPEGs, as the pipeline reads them) and their class ids."""
    samples = make_samples(recipe.train_seed, recipe.train_per_class)
    return [decode(s) for s in samples], torch.tensor([metadata(s)["label_id"] for s in samples])


def training_set(recipe: DitRecipe, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """What the DiT models, on the CPU: pixels in [-1, 1], or the latents of every image and of its mirror image
    (latent models cannot flip on the fly: the encoder is not mirror-equivariant). Encoding runs on `device`."""
    images, labels = training_images(recipe)
    if recipe.autoencoder is None:
        return PixelCodec(recipe.model_size, recipe.model_size).encode(images, torch.device("cpu")), labels
    autoencoder = load_autoencoder(recipe.autoencoder).to(device)
    pixels = PixelCodec(recipe.image_size, recipe.image_size).encode(images, torch.device("cpu"))
    with torch.no_grad():
        latents = [autoencoder.encode(batch.to(device)).cpu()
                   for view in (pixels, pixels.flip(-1)) for batch in view.split(512)]
    return torch.cat(latents), torch.cat([labels, labels])


# Training ----------------------------------------------------------------------------------------

def build_demo_model(recipe: DitRecipe) -> torch.nn.Module:
    torch.manual_seed(recipe.init_seed)
    return build_dit(recipe.model, input_size=recipe.model_size, in_channels=recipe.in_channels, learn_sigma=False,
                     num_classes=len(synthetic.CLASS_NAMES), class_dropout=recipe.class_dropout)


def make_optimizer(model: torch.nn.Module, recipe: DitRecipe, device: torch.device) -> torch.optim.AdamW:
    """The recipe's AdamW; on a GPU with tf32 matmuls (the GPU's fp32 speed, ample precision here) and the
    fused update (one kernel: a tiny model's step is launch-bound)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                             fused=device.type == "cuda")


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def steps_per_second(recipe: DitRecipe, device: torch.device | str, timed: int = 100) -> float:
    """The recipe's training-step rate on random batches of its shape (model, loss, optimizer)."""
    device = torch.device(device)
    dtype = training_dtype(recipe, device)
    model = build_demo_model(recipe).to(device)
    diffusion = Diffusion(recipe.schedule, recipe.diffusion_steps, recipe.prediction)
    opt = make_optimizer(model, recipe, device)
    x = torch.randn(recipe.batch_size, recipe.in_channels, recipe.model_size, recipe.model_size, device=device)
    y = torch.randint(0, model.config.num_classes, (recipe.batch_size,), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = diffusion.training_loss(model, x, y, min_snr_gamma=recipe.min_snr_gamma,
                                           outline_weight=recipe.outline_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # waits for the GPU

    for _ in range(min(20, timed)):
        step()
    start = time.monotonic()
    for _ in range(timed):
        step()
    return timed / (time.monotonic() - start)


def train_dit(recipe: DitRecipe, log_every: int | None = None, device: torch.device | str = "cpu",
              data: tuple[torch.Tensor, torch.Tensor] | None = None, checkpoint: str | Path | None = None,
              checkpoint_every: int = 0, on_checkpoint: Callable[[int, torch.nn.Module, list[dict]], None] | None = None,
              ) -> tuple[torch.nn.Module, list[dict]]:
    """The training loop; returns the EMA model (on the CPU) and a loss log.

    Batches, timesteps and noise come from one CPU generator, so `device` changes speed, not the draws.
    `data` is `training_set(recipe)` made beforehand (by a caller that times it); None makes it here.
    Every `checkpoint_every` steps the whole training state goes to `checkpoint` (replaced atomically), and
    `on_checkpoint(step, ema, log)` is called (e.g. to save the EMA weights of that step). A run started with an
    existing `checkpoint` of the same recipe resumes from it and ends exactly as an uninterrupted run would.
    """
    device = torch.device(device)
    dtype = training_dtype(recipe, device)
    log_every = log_every or max(100, recipe.steps // 36)
    data, labels = data or training_set(recipe, device)
    print(f"{dit_name(recipe)}: {len(labels)} training {'latents' if recipe.autoencoder else 'images'} of shape "
          f"{tuple(data.shape[1:])} (seed {recipe.train_seed})", flush=True)
    model = build_demo_model(recipe).to(device)
    diffusion = Diffusion(recipe.schedule, recipe.diffusion_steps, recipe.prediction)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, recipe, device)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, recipe.warmup_steps, recipe.steps, floor=0.1))
    gen = torch.Generator().manual_seed(recipe.init_seed)
    parts = {"model": model, "ema": ema, "opt": opt, "sched": sched}
    first, log, running, before = 0, [], 0.0, 0.0
    if checkpoint is not None and Path(checkpoint).is_file():
        first, log, running, before = _resume(Path(checkpoint), recipe, parts, gen, device)
        print(f"{dit_name(recipe)}: resumed at step {first} from {checkpoint}", flush=True)
    start = time.monotonic()
    model.train()
    for step in range(first, recipe.steps):
        idx = torch.randint(0, len(labels), (recipe.batch_size,), generator=gen)
        x = data[idx]
        if recipe.hflip and recipe.autoencoder is None:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with autocast(device, dtype):
            loss = diffusion.training_loss(model, x.to(device), labels[idx].to(device), generator=gen,
                                           min_snr_gamma=recipe.min_snr_gamma, outline_weight=recipe.outline_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # EMA warm-up: average over the steps seen so far until the decay takes over.
        _ema_update(ema, model, min(recipe.ema_decay, (1 + step) / (10 + step)))
        running += loss.item()
        seconds = before + time.monotonic() - start
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            n = (step % log_every) + 1
            log.append({"step": step + 1, "loss": round(running / n, 4), "minutes": round(seconds / 60, 2)})
            print(f"{dit_name(recipe)} step {step + 1}/{recipe.steps}: loss {running / n:.4f} "
                  f"({log[-1]['minutes']} min)", flush=True)
            running = 0.0
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < recipe.steps:
            if checkpoint is not None:
                _save_state(Path(checkpoint), recipe, parts, gen, device, step + 1, log, running, seconds)
            if on_checkpoint is not None:
                on_checkpoint(step + 1, ema, log)
    return ema.cpu(), log


def _save_state(path: Path, recipe: DitRecipe, parts: dict, gen: torch.Generator, device: torch.device, step: int,
                log: list[dict], running: float, seconds: float) -> None:
    """Everything a resumed run needs to continue bit for bit: weights, optimizer, schedule and every RNG."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(recipe=json.dumps(asdict(recipe)), step=step, log=json.dumps(log), running=running, seconds=seconds,
                 generator=gen.get_state(), torch_rng=torch.get_rng_state(),  # the global RNG drops labels
                 cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0))
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)  # a run killed while saving keeps the previous checkpoint


def _resume(path: Path, recipe: DitRecipe, parts: dict, gen: torch.Generator,
            device: torch.device) -> tuple[int, list[dict], float, float]:
    """Load `_save_state`'s file into the parts and RNGs; returns (step, log, running loss, seconds so far)."""
    state = torch.load(path, map_location=device, weights_only=True)
    if state["recipe"] != json.dumps(asdict(recipe)):
        raise InputError(f"checkpoint {path} is of another recipe: delete it or train its recipe")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return state["step"], json.loads(state["log"]), state["running"], state["seconds"]


# Outputs -----------------------------------------------------------------------------------------

def dit_name(recipe: DitRecipe) -> str:
    return DIT_NAME if recipe.autoencoder is None else LATENT_DIT_NAME


def codec_header(recipe: DitRecipe) -> dict[str, str]:
    """Pixel models: the space. Latent models: the autoencoder by name (the sampler looks beside the DiT, then
    in configs/models/) and the digest of its weights, so that no other autoencoder ever decodes this DiT."""
    if recipe.autoencoder is None:
        return {"space": "pixel"}
    path = autoencoder_file(recipe.autoencoder)
    return {"space": "latent", "autoencoder": path.stem,
            "autoencoder_sha256": read_weights_metadata(path)["weights_sha256"]}


def save_dit(model: torch.nn.Module, path: Path, recipe: DitRecipe, log: list[dict], seconds: float,
             trained_on: str = "CPU") -> None:
    """fp16 safetensors; the header carries everything needed to rebuild and sample the model."""
    meta = {
        "architecture": recipe.model, "dit_config": json.dumps(asdict(model.config)),
        "class_names": json.dumps(list(synthetic.CLASS_NAMES)), **codec_header(recipe),
        "image_size": str(recipe.image_size), "model_size": str(recipe.model_size),
        "schedule": recipe.schedule, "diffusion_steps": str(recipe.diffusion_steps),
        "prediction": recipe.prediction,
        "guidance": str(recipe.guidance), "sample_steps": str(recipe.sample_steps),
        **guidance_header(recipe),
        "recipe": json.dumps(asdict(recipe)), "loss_log": json.dumps(log), "train_seconds": f"{seconds:.0f}",
        "trained_on": trained_on, "software": f"python {platform.python_version()}, torch {torch.__version__}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(fp16_state(model), str(path), metadata=meta)


def guidance_header(recipe: DitRecipe) -> dict[str, str]:
    """The `guidance_negatives` table of the recipe's rule, if it names one."""
    if recipe.guidance_negatives is None:
        return {}
    if recipe.guidance_negatives not in GUIDANCE_NEGATIVES:
        raise ValueError(f"unknown guidance_negatives {recipe.guidance_negatives!r} "
                         f"(known: {', '.join(GUIDANCE_NEGATIVES)})")
    return {"guidance_negatives": json.dumps(GUIDANCE_NEGATIVES[recipe.guidance_negatives]())}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"
