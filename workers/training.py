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


# ViT: small batches give the many steps a from-scratch ViT needs to learn shape, not only colour.
VIT_RECIPE = Recipe(train_per_class=500, epochs=12, batch_size=32, lr=1e-3, warmup_steps=200, weight_decay=0.05)
# CLIP: only the text tower trains (the image tower is the locked ViT), so it needs far fewer steps.
CLIP_RECIPE = Recipe(train_per_class=250, epochs=6, batch_size=128, lr=1e-3, warmup_steps=50)


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
    """AdamW on the trainable parameters, no decay on gains, biases, temperature and CLIP embeddings;
    linear warm-up then cosine decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
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


def _fit(model: torch.nn.Module, recipe: Recipe, n: int, loss_for, desc: str, after_step=None,
         on_epoch=None) -> None:
    """The shared loop: `loss_for(indices, epoch)` returns the loss of one batch; `on_epoch(epoch)` reports."""
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
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        print(f"{desc} epoch {epoch + 1}/{recipe.epochs}: mean loss {total / max(1, len(bar)):.4f}", flush=True)
        if on_epoch:
            model.eval()
            on_epoch(epoch)
            model.train()
    model.eval()


# Training ----------------------------------------------------------------------------------------

# timm ViT block names -> open_clip VisionTransformer block names (same maths, other spelling).
_BLOCK_KEYS = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
               "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _channel_stats(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(cfg[key]).view(1, 3, 1, 1) for key in ("mean", "std"))


def init_image_tower_from_vit(visual: torch.nn.Module, vit: torch.nn.Module) -> None:
    """Copy a trained timm ViT trunk into an open_clip VisionTransformer of the same shape.

    open_clip's patch embedding has no bias and its preprocess normalises with CLIP's mean/std rather than
    the ViT's; both differences are folded into the weights, so the two towers compute the same features.
    """
    src = vit.state_dict()
    clip_mean, clip_std = _channel_stats(visual.preprocess_cfg)
    vit_mean, vit_std = _channel_stats(vit.pretrained_cfg)
    weight = src["patch_embed.proj.weight"]
    # The ViT sees x_clip * clip_std / vit_std + (clip_mean - vit_mean) / vit_std, per input channel.
    bias = src["patch_embed.proj.bias"] + (weight * (clip_mean - vit_mean) / vit_std).sum(dim=(1, 2, 3))
    positions = src["pos_embed"][0].clone()
    positions[1:] += bias  # every patch token gets the bias; the CLS token never passes the patch embedding
    state = {"conv1.weight": weight * clip_std / vit_std, "class_embedding": src["cls_token"].flatten(),
             "positional_embedding": positions, "ln_post.weight": src["norm.weight"], "ln_post.bias": src["norm.bias"]}
    for key, value in src.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for timm_name, clip_name in _BLOCK_KEYS.items():
                rest = rest.replace(timm_name, clip_name) if rest.startswith(timm_name) else rest
            state[f"transformer.resblocks.{index}.{rest}"] = value
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"proj"}:
        raise ValueError(f"ViT and CLIP image tower differ: missing {missing}, unexpected {unexpected}")


def train_clip(recipe: Recipe, vit: VitLabeler, on_epoch=None) -> ClipEmbedder:
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

    def loss_for(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        texts = model.encode_text(tokens[epoch][idx], normalize=True)
        return loss_fn(images[idx], texts, model.logit_scale.exp())

    def clamp_temperature() -> None:
        with torch.no_grad():  # as in CLIP: the logit scale may not exceed 100
            model.logit_scale.clamp_(0, math.log(100))

    _fit(model, recipe, len(samples), loss_for, CLIP_NAME, after_step=clamp_temperature,
         on_epoch=on_epoch and (lambda epoch: on_epoch(clip, epoch)))
    return clip


def train_vit(recipe: Recipe, on_epoch=None) -> VitLabeler:
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

    _fit(vit.model, recipe, len(samples), loss_for, VIT_NAME,
         on_epoch=on_epoch and (lambda epoch: on_epoch(vit, epoch)))
    return vit


# Evaluation --------------------------------------------------------------------------------------

# What the shipped demo models must reach on held-out data (issue 3).
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

def save_weights(model: torch.nn.Module, path: Path, recipe: Recipe) -> None:
    """fp16 safetensors (loaders cast back to fp32) with class names and recipe in the header."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"class_names": json.dumps(list(synthetic.CLASS_NAMES)),
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
        f"Synthetic shapes from `workers/synthetic.py`: 24 classes (`<color> <shape>`), 64x64 JPEGs, one shape "
        f"per image with random size, position, rotation, background and colour jitter. Training: "
        f"{recipe.train_per_class} images per class, seed {recipe.train_seed}, captions drawn from TRAIN_TEMPLATES. "
        f"Held-out evaluation: {recipe.eval_per_class} images per class, seed {recipe.eval_seed} "
        "(never used for training), captioned with EVAL_TEMPLATES.", "",
        "## Hyper-parameters", "", "| name | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in asdict(recipe).items()], "",
        "## Measured on held-out data", "", "| metric | value | target |", "|---|---|---|",
        *[f"| {k} | {_fmt(v)} | {TARGETS.get(k, '')} |" for k, v in headline.items()], "",
        *_template_table(metrics.get("per_template")),
        f"Training time: {seconds / 60:.1f} min on CPU ({_versions()}).", "",
        "## Reproduce", "", "```", REPRODUCE, "```", "",
    ]
    path.write_text("\n".join(lines))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


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
               "A timm Vision Transformer (architecture `configs/models/shapes-vit.json`: 8x8 patch embedding, "
               "CLS token, learned position embeddings, pre-norm blocks with GELU MLPs) trained from scratch "
               "with cross-entropy (label smoothing 0.1) to predict the 24 classes.", recipe, metrics, seconds)
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
               "An open_clip model (architecture `configs/models/shapes-clip.json`: ViT image tower, transformer "
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
