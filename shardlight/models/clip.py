"""The CLIP adapter: an open_clip model by name plus weights, its eval transform and tokenizer.

Vectors come back L2-normalised float32 on the CPU, whatever the device and autocast dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shardlight.core.config import ClipSpec
from shardlight.core.errors import ModelLoadError
from shardlight.models.device import autocast
from shardlight.models.weights import MODEL_DIR, check_weight_files, offline_hint, register_repo_models


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
            raise offline_hint(f"open_clip {spec.model!r} pretrained={pretrained!r}", err) from None
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


