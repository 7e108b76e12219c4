"""Model adapters: one factory per family, each building by name (architecture) plus weights.

- CLIP: open_clip architectures (built-in names, or JSON configs in configs/models/) with a pretrained
  tag or a local weights file.
- Labelers: a timm classifier (`vit`) or CLIP zero-shot prompts (`zeroshot`), chosen from LABELERS.

Weights load only through safetensors or `torch.load(weights_only=True)`; with no network and no local
file the error is one line saying what was looked for and how to supply it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workers.config import CONFIG_DIR, ClipSpec, LabelSpec
from workers.device import autocast
from workers.errors import ModelLoadError

MODEL_DIR = CONFIG_DIR / "models"


@cache
def register_repo_models() -> None:
    """Make configs/models/*.json CLIP architectures known to open_clip and this repo's timm architectures
    (workers/architectures.py) known to timm (idempotent)."""
    import open_clip

    import workers.architectures  # noqa: F401  (registers with timm on import)

    open_clip.add_model_config(MODEL_DIR)


def _is_path(value: str) -> bool:
    return value.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in value or Path(value).exists()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (class names, training recipe)."""
    if Path(path).suffix != ".safetensors":
        return {}
    if not Path(path).is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def check_weight_files(clip: ClipSpec | None, labels: LabelSpec | None) -> None:
    """Fail fast, before any worker starts, on local weight or class-name files that do not exist."""
    wanted = []
    if clip is not None and clip.pretrained and _is_path(clip.pretrained):
        wanted.append(("CLIP weights", clip.pretrained))
    if labels is not None and labels.kind != "none":
        if labels.checkpoint:
            wanted.append(("classifier weights", labels.checkpoint))
        if isinstance(labels.class_names, str):
            wanted.append(("class_names file", labels.class_names))
    for what, path in wanted:
        if not Path(path).is_file():
            raise ModelLoadError(f"{what} file not found: {path}")


def _offline_hint(what: str, err: Exception) -> ModelLoadError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"could not load {what}: {first[:160]} — no network to a model hub here? Download the weights "
        "where there is network and point the config at the local file (see README, 'Real pretrained weights')."
    )


class ClipEmbedder:
    """An open_clip model with its eval transform and tokenizer; returns L2-normalised float32 vectors."""

    def __init__(self, spec: ClipSpec, device: torch.device, dtype: torch.dtype = torch.float32):
        import open_clip

        register_repo_models()
        if open_clip.get_model_config(spec.model) is None and not spec.model.startswith("hf-hub:"):
            known = ", ".join(sorted(open_clip.list_models())[:8])
            raise ModelLoadError(f"unknown open_clip model {spec.model!r} (e.g. {known}, or a JSON in {MODEL_DIR})")
        check_weight_files(spec, None)
        pretrained = spec.pretrained
        torch.manual_seed(spec.seed)  # an untrained model must be identical on every worker
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained)
        except Exception as err:  # hub download failures surface as many exception types
            raise _offline_hint(f"open_clip {spec.model!r} pretrained={pretrained!r}", err) from None
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.device, self.dtype = device, dtype
        self.dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
            else int(self.model.visual.output_dim)

    @torch.inference_mode()
    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        with autocast(self.device, self.dtype):
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with autocast(self.device, self.dtype):
            feats = self.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


class Labels:
    """Top-1 and top-k class predictions for one batch."""

    def __init__(self, probs: torch.Tensor, names: list[str], top_k: int):
        k = min(top_k, probs.shape[1])
        top = probs.topk(k, dim=1)
        self.ids = top.indices.cpu().numpy().astype(np.int32)
        self.probs = top.values.float().cpu().numpy()
        self.names = [names[i] for i in self.ids[:, 0]]


def _read_class_names(value: list[str] | str | None) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    path = Path(value)
    if not path.is_file():
        raise ModelLoadError(f"class_names file not found: {value}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class VitLabeler:
    """A timm image classifier: repo JSON configs (configs/models/NAME.json) or any timm model name."""

    uses_clip_pixels = False

    def __init__(self, spec: LabelSpec, device: torch.device, dtype: torch.dtype = torch.float32, clip=None):
        import timm
        from timm.data import create_transform, resolve_data_config

        register_repo_models()
        names = _read_class_names(spec.class_names)
        meta = read_weights_metadata(spec.checkpoint) if spec.checkpoint else {}
        if names is None and "class_names" in meta:
            names = json.loads(meta["class_names"])
        repo_cfg = MODEL_DIR / f"{spec.model}.json"
        try:
            if repo_cfg.is_file():
                cfg = json.loads(repo_cfg.read_text())
                names = names or cfg.get("class_names")
                model = timm.create_model(cfg["architecture"], pretrained=False,
                                          num_classes=len(names), **cfg.get("model_args", {}))
            else:
                extra = {"num_classes": len(names)} if names and spec.checkpoint else {}
                model = timm.create_model(spec.model, pretrained=spec.pretrained, **extra)
        except ModelLoadError:
            raise
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ModelLoadError(f"unknown timm model {spec.model!r} (see timm.list_models())") from None
            raise _offline_hint(f"timm {spec.model!r} pretrained={spec.pretrained}", err) from None
        except Exception as err:
            raise _offline_hint(f"timm {spec.model!r} pretrained={spec.pretrained}", err) from None
        if spec.checkpoint:
            model.load_state_dict(load_weights_file(spec.checkpoint))
        if names is None:
            names = _imagenet_names(model.num_classes)
        if len(names) != model.num_classes:
            raise ModelLoadError(f"{len(names)} class names for a classifier with {model.num_classes} classes")
        self.model = model.to(device).eval()
        self.transform = create_transform(**resolve_data_config({}, model=model))
        self.class_names, self.top_k = names, spec.top_k
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, image_embeddings: np.ndarray | None = None) -> Labels:
        with autocast(self.device, self.dtype):
            logits = self.model(pixels.to(self.device, non_blocking=True))
        return Labels(logits.float().softmax(dim=1), self.class_names, self.top_k)


def _imagenet_names(num_classes: int) -> list[str]:
    if num_classes != 1000:
        return [str(i) for i in range(num_classes)]
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


class ZeroShotLabeler:
    """Labels by CLIP similarity to one prompt per class, reusing the image embeddings already computed."""

    uses_clip_pixels = True
    transform = None

    def __init__(self, spec: LabelSpec, device: torch.device, dtype: torch.dtype = torch.float32, clip=None):
        names = _read_class_names(spec.class_names)
        if not names:
            raise ModelLoadError("labels.kind 'zeroshot' needs labels.class_names (a list or a text file)")
        if clip is None:
            raise ModelLoadError("zero-shot labels need the CLIP model")
        self.class_names, self.top_k, self.logit_scale = names, spec.top_k, clip.logit_scale
        self.class_embeddings = torch.from_numpy(clip.embed_texts([spec.prompt.format(n) for n in names]))

    def __call__(self, pixels: torch.Tensor, image_embeddings: np.ndarray | None = None) -> Labels:
        sims = torch.from_numpy(image_embeddings) @ self.class_embeddings.T
        return Labels((self.logit_scale * sims).softmax(dim=1), self.class_names, self.top_k)


LABELERS = {"vit": VitLabeler, "zeroshot": ZeroShotLabeler}


def build_labeler(spec: LabelSpec, device: torch.device, dtype: torch.dtype, clip: ClipEmbedder | None):
    if spec.kind == "none":
        return None
    return LABELERS[spec.kind](spec, device, dtype, clip=clip)
