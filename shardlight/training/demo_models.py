"""Train the demo models on synthetic shapes: a small CLIP (open_clip) and a small ViT classifier (timm).

Both train on CPU in minutes from data regenerated with `shardlight.training.synthetic`, are evaluated on a pool made
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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from shardlight.core.config import ClipSpec, LabelSpec
from shardlight.models.clip import ClipEmbedder
from shardlight.models.labelers import VitLabeler
from shardlight.models.weights import register_repo_models
from shardlight.training import synthetic

CLIP_NAME, VIT_NAME = "shapes-clip", "shapes-vit"
REPRODUCE = "shardlight train-demo-models OUT_DIR"


@dataclass(frozen=True)
class Recipe:
    """Data and optimisation settings for one model; stored in its weights and card."""

    train_seed: int = 0  # synthetic data seed for training images and captions
    eval_seed: int = 1001  # held-out pool seed: never used for training data
    init_seed: int = 0  # torch seed for weight init and batch order
    train_per_class: int = 500  # fixed training set: images per class (24 classes); unused when `steps` > 0
    eval_per_class: int = 20  # held-out images per class
    epochs: int = 8  # passes over the fixed training set; unused when `steps` > 0
    steps: int = 0  # > 0: train this many steps, each on a freshly rendered batch (no image is seen twice)
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak learning rate, after linear warm-up, cosine decay to 0
    warmup_steps: int = 100
    weight_decay: float = 0.1


# ViT: a fresh batch every step. A fixed set of a few thousand images is memorised before shape is learnt;
# new images learn it by ~1,500 steps, and 3,000 leave a margin over the 0.95 target (~15 min on 2 cores).
VIT_RECIPE = Recipe(steps=3000, batch_size=64, lr=2e-3, warmup_steps=200, weight_decay=0.05)
# CLIP: only the text tower trains (the image tower is the locked ViT), so a fixed set and few steps do.
CLIP_RECIPE = Recipe(train_per_class=250, epochs=10, batch_size=128, lr=1e-3, warmup_steps=50)


def _quick(recipe: Recipe) -> Recipe:
    """A smoke-test recipe: a few steps on a handful of images, same code path."""
    return replace(recipe, train_per_class=3, eval_per_class=2, epochs=1, steps=min(recipe.steps, 3),
                   batch_size=24, warmup_steps=1)


# Data --------------------------------------------------------------------------------------------

def make_samples(seed: int, per_class: int, templates: tuple[str, ...] = synthetic.TRAIN_TEMPLATES) -> list[dict]:
    """Class-balanced WebDataset-style samples (JPEG bytes + metadata), deterministic for `seed`."""
    rng = random.Random(f"demo-models-{seed}")
    n = per_class * len(synthetic.CLASS_NAMES)
    return [synthetic.sample(rng, f"{seed}-{i:06d}", label_id=i % len(synthetic.CLASS_NAMES), templates=templates)
            for i in range(n)]


def fresh_batches(seed: int, batch_size: int, steps: int, transform) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of newly rendered images with uniformly drawn classes, deterministic for `seed`."""
    rng = random.Random(f"demo-models-stream-{seed}")
    classes = len(synthetic.CLASS_NAMES)
    for step in range(steps):
        samples = [synthetic.sample(rng, f"s{seed}-{step}-{i}", label_id=rng.randrange(classes))
                   for i in range(batch_size)]
        yield to_pixels(samples, transform), torch.tensor([metadata(s)["label_id"] for s in samples])


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

def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay from 1 to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, recipe: Recipe, total_steps: int):
    """AdamW on the trainable parameters, no decay on gains, biases, temperature and CLIP embeddings;
    linear warm-up then cosine decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))

    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, recipe.warmup_steps, total_steps))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; the last partial batch is dropped so contrastive batches stay full."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _epochs(n: int, recipe: Recipe) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, indices) over a fixed set of n items, reshuffled every epoch."""
    generator = torch.Generator().manual_seed(recipe.init_seed)
    for epoch in range(recipe.epochs):
        for idx in _batches(n, recipe.batch_size, generator):
            yield epoch, idx


def _fit(model: torch.nn.Module, recipe: Recipe, batches: Iterable, total_steps: int, loss_for, desc: str,
         after_step=None) -> None:
    """The shared loop: `loss_for(batch)` returns the loss of one item of `batches`."""
    opt, schedule = _optimizer(model, recipe, total_steps)
    model.train()
    bar = tqdm(batches, total=total_steps, desc=desc, mininterval=5)
    running = None
    for step, batch in enumerate(bar):
        loss = loss_for(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if after_step:
            after_step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        if (step + 1) % max(1, total_steps // 8) == 0:
            print(f"{desc} step {step + 1}/{total_steps}: loss {running:.4f}", flush=True)
    model.eval()


# Training ----------------------------------------------------------------------------------------

def init_image_tower_from_vit(visual: torch.nn.Module, vit: torch.nn.Module) -> None:
    """Copy a trained classifier's trunk into CLIP's timm image tower (same registered architecture).

    Both are `shapes_vit_hybrid`: only the classifier head is left behind (open_clip's tower ends in its own
    projection), and both normalise inputs with CLIP's mean/std, so the features are the same.
    """
    for key in ("mean", "std"):
        if tuple(visual.preprocess_cfg[key]) != tuple(vit.pretrained_cfg[key]):
            raise ValueError(f"ViT and CLIP image tower normalise differently ({key})")
    trunk = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    visual.trunk.load_state_dict(trunk)  # strict: a mismatch in architecture is an error


def train_clip(recipe: Recipe, vit: VitLabeler) -> ClipEmbedder:
    """Locked-image tuning (LiT, Zhai et al. 2022): CLIP's contrastive loss with a learned temperature, the
    image tower initialised from the trained ViT classifier and locked; the text tower learns to meet it.

    Training a CLIP image tower from scratch needs far more compute than 2 CPU cores have in minutes; the
    classifier has already learnt colour and shape, which is what the captions name.
    """
    from open_clip.loss import ClipLoss

    clip = ClipEmbedder(ClipSpec(model=CLIP_NAME, seed=recipe.init_seed), torch.device("cpu"))
    model = clip.model
    init_image_tower_from_vit(model.visual, vit.model)
    model.visual.requires_grad_(False)
    samples = make_samples(recipe.train_seed, recipe.train_per_class)
    print(f"{CLIP_NAME}: {len(samples)} training images (seed {recipe.train_seed}), image tower locked", flush=True)
    with torch.no_grad():  # a locked tower: embed every training image once
        pixels = to_pixels(samples, clip.preprocess)
        images = torch.cat([model.encode_image(pixels[i:i + 256], normalize=True) for i in range(0, len(pixels), 256)])
    captions = random.Random(f"captions-{recipe.train_seed}")
    tokens = [clip.tokenizer(recaption(samples, captions)) for _ in range(recipe.epochs)]
    loss_fn = ClipLoss()

    def loss_for(batch: tuple[int, torch.Tensor]) -> torch.Tensor:
        epoch, idx = batch
        texts = model.encode_text(tokens[epoch][idx], normalize=True)
        return loss_fn(images[idx], texts, model.logit_scale.exp())

    def clamp_temperature() -> None:
        with torch.no_grad():  # as in CLIP: the logit scale may not exceed 100
            model.logit_scale.clamp_(0, math.log(100))

    total = recipe.epochs * (len(samples) // recipe.batch_size)
    _fit(model, recipe, _epochs(len(samples), recipe), total, loss_for, CLIP_NAME, after_step=clamp_temperature)
    return clip


def train_vit(recipe: Recipe) -> VitLabeler:
    """Cross-entropy training of the ViT classifier, built exactly as the label stage builds it, on a fresh
    batch of rendered images every step."""
    torch.manual_seed(recipe.init_seed)  # timm initialises from the global generator
    vit = VitLabeler(LabelSpec(kind="vit", model=VIT_NAME), torch.device("cpu"))
    if tuple(vit.class_names) != synthetic.CLASS_NAMES:
        raise ValueError(f"{VIT_NAME}.json class_names must equal shardlight.training.synthetic.CLASS_NAMES, in order")
    print(f"{VIT_NAME}: {recipe.steps} steps x {recipe.batch_size} new images (seed {recipe.train_seed})", flush=True)

    def loss_for(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pixels, labels = batch
        return F.cross_entropy(vit.model(pixels), labels, label_smoothing=0.1)

    batches = fresh_batches(recipe.train_seed, recipe.batch_size, recipe.steps, vit.transform)
    _fit(vit.model, recipe, batches, recipe.steps, loss_for, VIT_NAME)
    return vit


# Evaluation --------------------------------------------------------------------------------------

# What the shipped demo models must reach on held-out data (docs/models.md).
TARGETS = {"t2i_precision_at_10_min": 0.80, "i2t_top1_min": 0.90, "top1": 0.95}


def held_out_samples(seed: int, per_class: int) -> list[dict]:
    """An evaluation pool captioned only with phrasings never used in training."""
    return make_samples(seed, per_class, templates=synthetic.EVAL_TEMPLATES)


def _labels(samples: list[dict]) -> torch.Tensor:
    return torch.tensor([metadata(s)["label_id"] for s in samples])


def evaluate_clip(clip: ClipEmbedder, samples: list[dict]) -> dict:
    """Text→image precision@10 per class prompt and image→text top-1, for every class-prompt phrasing.

    The headline numbers are the worst over phrasings (and, for precision, over classes).
    """
    labels = _labels(samples)
    images = torch.cat([torch.from_numpy(clip.embed_images(to_pixels(samples[i:i + 256], clip.preprocess)))
                        for i in range(0, len(samples), 256)])
    classes = torch.arange(len(synthetic.CLASS_NAMES))
    per_template = {}
    for template in class_prompt_templates():
        prompts = [template.format(color=c, shape=s) for c, s in (n.split(" ") for n in synthetic.CLASS_NAMES)]
        sims = torch.from_numpy(clip.embed_texts(prompts)) @ images.T  # (classes, images)
        precision = (labels[sims.topk(10, dim=1).indices] == classes[:, None]).float().mean(dim=1)
        per_template[template] = {
            "t2i_precision_at_10_min": float(precision.min()),
            "t2i_precision_at_10_mean": float(precision.mean()),
            "i2t_top1": float((sims.argmax(dim=0) == labels).float().mean()),
        }
    rows = per_template.values()
    return {
        "t2i_precision_at_10_min": min(r["t2i_precision_at_10_min"] for r in rows),
        "t2i_precision_at_10_mean": sum(r["t2i_precision_at_10_mean"] for r in rows) / len(rows),
        "i2t_top1_min": min(r["i2t_top1"] for r in rows),
        "i2t_top1_mean": sum(r["i2t_top1"] for r in rows) / len(rows),
        "eval_images": len(samples),
        "per_template": per_template,
    }


def evaluate_vit(vit: VitLabeler, samples: list[dict]) -> dict:
    """Top-1 accuracy, comparing predicted class names with the rendered ground truth."""
    truth = [metadata(s)["label"] for s in samples]
    predicted = [name for i in range(0, len(samples), 256)
                 for name in vit(to_pixels(samples[i:i + 256], vit.transform)).names]
    return {"top1": sum(p == t for p, t in zip(predicted, truth)) / len(samples), "eval_images": len(samples)}


# Outputs -----------------------------------------------------------------------------------------

def fp16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to ship: floats as fp16 (loaders cast back to fp32); integer buffers (BatchNorm's
    batch counters) keep their type."""
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: Path, recipe: Recipe) -> None:
    """fp16 safetensors with class names and recipe in the header."""
    save_file(fp16_state(model), str(path), metadata={"class_names": json.dumps(list(synthetic.CLASS_NAMES)),
                                          "recipe": json.dumps(asdict(recipe))})


def _versions() -> str:
    import open_clip
    import timm

    return (f"python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
            f"timm {timm.__version__}, {torch.get_num_threads()} CPU threads")


def write_card(path: Path, title: str, summary: str, recipe: Recipe, metrics: dict, seconds: float) -> None:
    """A markdown model card: what the model is, its data recipe, hyper-parameters and measured metrics."""
    headline = {k: v for k, v in metrics.items() if k != "per_template"}
    lines = [
        f"# {title}", "", summary, "",
        "## Data",
        f"Synthetic shapes from `shardlight/training/synthetic.py`: 24 classes (`<color> <shape>`), 64x64 JPEGs, one shape "
        f"per image with random size, position, rotation, background and colour jitter. Training: "
        f"{_training_data(recipe)}, seed {recipe.train_seed}, captions drawn from TRAIN_TEMPLATES. "
        f"Held-out evaluation: {recipe.eval_per_class} images per class, seed {recipe.eval_seed} "
        "(never used for training), captioned with EVAL_TEMPLATES.", "",
        "## Hyper-parameters", "", "| name | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in asdict(recipe).items()], "",
        "## Measured on held-out data", "", "| metric | value | target |", "|---|---|---|",
        *[f"| {k} | {fmt_metric(v)} | {TARGETS.get(k, '')} |" for k, v in headline.items()], "",
        *_template_table(metrics.get("per_template")),
        f"Training time: {seconds / 60:.1f} min on CPU ({_versions()}).", "",
        "## Reproduce", "", "```", REPRODUCE, "```", "",
    ]
    path.write_text("\n".join(lines))


def _training_data(recipe: Recipe) -> str:
    if recipe.steps:
        return (f"a freshly rendered batch of {recipe.batch_size} images (uniform classes) at each of "
                f"{recipe.steps} steps, {recipe.steps * recipe.batch_size:,} images in all")
    return f"{recipe.train_per_class} images per class for {recipe.epochs} epochs"


def fmt_metric(value, missing: str = "not measured") -> str:
    """A metric for a model card's table: floats to 3 decimals, None as `missing`."""
    return missing if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _template_table(per_template: dict | None) -> list[str]:
    if not per_template:
        return []
    rows = [f"| `{t}` | {'held-out' if t in synthetic.EVAL_TEMPLATES else 'training'} | "
            f"{r['t2i_precision_at_10_min']:.3f} | {r['t2i_precision_at_10_mean']:.3f} | {r['i2t_top1']:.3f} |"
            for t, r in per_template.items()]
    return ["Per class-prompt phrasing (text→image precision@10 worst class / mean, image→text top-1):", "",
            "| prompt | phrasing | t2i P@10 min | t2i P@10 mean | i2t top-1 |", "|---|---|---|---|---|", *rows, ""]


# Entry point -------------------------------------------------------------------------------------

def _timed(train, *args):
    start = time.monotonic()
    model = train(*args)
    return model, time.monotonic() - start


def load_vit(path: Path) -> VitLabeler:
    return VitLabeler(LabelSpec(kind="vit", model=VIT_NAME, checkpoint=str(path)), torch.device("cpu"))


def _make_vit(out: Path, recipe: Recipe) -> dict:
    vit, seconds = _timed(train_vit, recipe)
    path = out / f"{VIT_NAME}.safetensors"
    save_weights(vit.model, path, recipe)
    # Evaluate what was written, loaded the way the pipeline loads it (fp16 file into the fp32 model).
    metrics = evaluate_vit(load_vit(path), held_out_samples(recipe.eval_seed, recipe.eval_per_class))
    write_card(out / f"{VIT_NAME}.md", f"{VIT_NAME}: a small ViT classifier for the synthetic shapes demo",
               "A hybrid Vision Transformer (Dosovitskiy et al. 2021, §3.1), registered with timm as "
               "`shapes_vit_hybrid` (shardlight/models/architectures.py; `configs/models/shapes-vit.json`): a 3-block "
               "conv stem turns the 64x64 image into an 8x8 map whose cells are the patch tokens, then a ViT "
               "(CLS token, learned position embeddings, 4 pre-norm blocks of width 64 with GELU MLPs). "
               "Trained from scratch with cross-entropy (label smoothing 0.1) to predict the 24 classes.",
               recipe, metrics, seconds)
    return {**metrics, "train_seconds": round(seconds, 1), "weights": str(path)}


def _make_clip(out: Path, recipe: Recipe) -> dict:
    vit_path = out / f"{VIT_NAME}.safetensors"
    if not vit_path.is_file():
        raise FileNotFoundError(f"{vit_path} is missing: the CLIP image tower starts from the trained ViT")
    clip, seconds = _timed(train_clip, recipe, load_vit(vit_path))
    path = out / f"{CLIP_NAME}.safetensors"
    save_weights(clip.model, path, recipe)
    shipped = ClipEmbedder(ClipSpec(model=CLIP_NAME, pretrained=str(path)), torch.device("cpu"))
    metrics = evaluate_clip(shipped, held_out_samples(recipe.eval_seed, recipe.eval_per_class))
    write_card(out / f"{CLIP_NAME}.md", f"{CLIP_NAME}: a small CLIP for the synthetic shapes demo",
               "An open_clip model (architecture `configs/models/shapes-clip.json`: open_clip's timm image tower "
               "holding the `shapes_vit_hybrid` ViT, a transformer "
               "text tower with open_clip's tokenizer) trained with the CLIP contrastive loss and a learned "
               "temperature, by locked-image tuning (LiT, Zhai et al. 2022): the image tower is a copy of the "
               f"trained `{VIT_NAME}` trunk (its classifier head dropped) and stays locked, while the text "
               "tower learns to meet it. Time below excludes the ViT's own training.", recipe, metrics, seconds)
    return {**metrics, "train_seconds": round(seconds, 1), "weights": str(path)}


def train_demo_models(out_dir: str | Path, *, clip: bool = True, vit: bool = True, quick: bool = False,
                      threads: int = 2) -> dict:
    """Regenerate the synthetic data, train the demo ViT and CLIP on CPU, evaluate, write weights and cards.

    The ViT trains first: the CLIP image tower starts from it (with `vit=False`, from the ViT already in
    `out_dir`).

    Args:
        out_dir: folder for `shapes-vit.safetensors`, `shapes-clip.safetensors` and their `.md` cards.
        clip: train the CLIP model.
        vit: train the ViT classifier.
        quick: a few steps on a handful of images (smoke test); the models will not meet the targets.
        threads: torch CPU threads; 1 is faster when other work keeps the cores busy.

    Returns:
        `{"vit": metrics, "clip": metrics}` for the models trained, measured on held-out data.
    """
    torch.set_num_threads(threads)
    register_repo_models()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if vit:
        results["vit"] = _make_vit(out, _quick(VIT_RECIPE) if quick else VIT_RECIPE)
    if clip:
        results["clip"] = _make_clip(out, _quick(CLIP_RECIPE) if quick else CLIP_RECIPE)
    return results
