"""Labelers: a timm classifier (`vit`) or CLIP zero-shot prompts (`zeroshot`), chosen by name from LABELERS.

Each returns `Labels` (top-1 and top-k ids, names, probabilities) for a batch; a labeler that reuses CLIP's
image embeddings says so with `uses_clip_pixels`. A labeler with its own pixels exposes `pixel_spec` (None
when its transform cannot be split) and takes uint8 batches, normalised on its device.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from shardlight.core.config import LabelSpec
from shardlight.core.errors import ModelLoadError
from shardlight.models.clip import ClipEmbedder, device_pixels, spec_or_none
from shardlight.models.device import autocast
from shardlight.models.weights import (
    MODEL_DIR,
    class_names_for,
    load_weights_file,
    offline_hint,
    read_class_names,
    read_weights_metadata,
    register_repo_models,
)


class Labels:
    """Top-1 and top-k class predictions for one batch."""

    def __init__(self, probs: torch.Tensor, names: list[str], top_k: int):
        k = min(top_k, probs.shape[1])
        top = probs.topk(k, dim=1)
        self.ids = top.indices.cpu().numpy().astype(np.int32)
        self.probs = top.values.float().cpu().numpy()
        self.names = [names[i] for i in self.ids[:, 0]]

    def row(self, i: int) -> dict:
        """The label fields of `shardlight.core.schema.Row` for the batch's i-th image."""
        return {"label_id": int(self.ids[i, 0]), "label": self.names[i], "label_prob": float(self.probs[i, 0]),
                "topk_ids": self.ids[i].tolist(), "topk_probs": self.probs[i].tolist()}


class VitLabeler:
    """A timm image classifier: repo JSON configs (configs/models/NAME.json) or any timm model name."""

    uses_clip_pixels = False

    def __init__(self, spec: LabelSpec, device: torch.device, dtype: torch.dtype = torch.float32, clip=None):
        import timm
        from timm.data import create_transform, resolve_data_config

        register_repo_models()
        names = read_class_names(spec.class_names)
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
            raise offline_hint(f"timm {spec.model!r} pretrained={spec.pretrained}", err) from None
        except Exception as err:
            raise offline_hint(f"timm {spec.model!r} pretrained={spec.pretrained}", err) from None
        if spec.checkpoint:
            model.load_state_dict(load_weights_file(spec.checkpoint))
        if names is None:
            names = class_names_for(model.num_classes)
        if len(names) != model.num_classes:
            raise ModelLoadError(f"{len(names)} class names for a classifier with {model.num_classes} classes")
        self.model = model.to(device).eval()
        self.transform = create_transform(**resolve_data_config({}, model=model))
        self.pixel_spec = spec_or_none(self.transform)
        self.class_names, self.top_k = names, spec.top_k
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, image_embeddings: np.ndarray | None = None) -> Labels:
        pixels = device_pixels(pixels, self.pixel_spec, self.model, self.device)
        with autocast(self.device, self.dtype):
            logits = self.model(pixels)
        return Labels(logits.float().softmax(dim=1), self.class_names, self.top_k)


class ZeroShotLabeler:
    """Labels by CLIP similarity to one prompt per class, reusing the image embeddings already computed."""

    uses_clip_pixels = True
    transform = None
    pixel_spec = None

    def __init__(self, spec: LabelSpec, device: torch.device, dtype: torch.dtype = torch.float32, clip=None):
        names = read_class_names(spec.class_names)
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
