"""The CLIP adapter: an open_clip model by name plus weights, its eval transform and tokenizer.

Vectors come back L2-normalised float32 on the CPU, whatever the device and dtype. Images come as
uint8 batches (normalised here, on the model's device, from `pixel_spec`) or as already-normalised floats.
Captions run at their real length where that gives the same vectors as open_clip's padded 77 tokens (see
`_cuts_text`): sorted by length into buckets, each cut to its longest caption; any other text tower gets the
full context.

Precision (`use_dtype`): on a GPU a lower dtype runs under autocast over float32 weights. On a CPU, bf16 is
bf16 weights without autocast: under autocast torch leaves open_clip's attention on its slow path, whose input
projection takes a transposed activation and a freshly cast (so frozen) weight, and at::matmul then expands
that weight once per token position into a batched product; bf16 weights that keep `requires_grad` fold
into one matrix product instead (measured: docs/benchmarks.md, "bf16 weights on an AMX CPU"). The
parameters are therefore never frozen here; inference_mode keeps autograd out of the way.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from shardlight.core.config import ClipSpec
from shardlight.core.errors import ModelLoadError
from shardlight.models.device import autocast
from shardlight.models.preprocess import PixelSpec, normalize, pixel_spec
from shardlight.models.weights import (
    MODEL_DIR,
    check_weight_files,
    init_skipped,
    offline_hint,
    register_repo_models,
)

# Captions per text bucket on a CPU: large enough to keep matmuls efficient, small enough that a bucket's
# longest caption is close to its others (docs/benchmarks.md).
TEXT_BUCKET = 16


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
        # With weights, open_clip loads the whole model strictly: its random start would be thrown away.
        building = init_skipped() if pretrained else contextlib.nullcontext()
        try:
            with building:
                model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained)
        except Exception as err:  # hub download failures surface as many exception types
            raise offline_hint(f"open_clip {spec.model!r} pretrained={pretrained!r}", err) from None
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.pixel_spec = spec_or_none(preprocess)
        self.cuts_text = _cuts_text(self.model, self.tokenizer)
        self.device = device
        self._logit_scale = float(self.model.logit_scale.exp().item())  # before any cast rounds it
        self.use_dtype(dtype)
        self.dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
            else int(self.model.visual.output_dim)

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Run in `dtype` from now on (see the module's note on CPU bf16)."""
        self.dtype = dtype
        weights = dtype if self.device.type == "cpu" and dtype == torch.bfloat16 else torch.float32
        self.model.to(weights)

    @torch.inference_mode()
    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) uint8 (normalised here by `pixel_spec`) or float pixels -> (N, dim) unit vectors."""
        pixels = device_pixels(pixels, self.pixel_spec, self.model, self.device)
        with self._precision():
            feats = self.model.encode_image(pixels)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.embed_tokens(self.tokenizer(texts))  # padded (or cut) to the context as open_clip does

    @torch.inference_mode()
    def embed_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Token ids from `self.tokenizer` (tokenised elsewhere, e.g. in helper processes) -> unit vectors."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        with self._precision():
            if self.cuts_text:
                feats = self._encode_text_buckets(tokens)
            else:
                feats = self.model.encode_text(tokens.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def _encode_text_buckets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Captions sorted by length and run in buckets, each cut to its own longest caption.

        One long caption no longer makes the whole batch pay for its length. On a GPU the batch stays whole:
        there the cost is the number of kernel launches, not the padded tokens.
        """
        lengths = (tokens != 0).sum(dim=1)  # SimpleTokenizer pads with 0
        bucket = len(tokens) if self.device.type != "cpu" else TEXT_BUCKET
        order = torch.argsort(lengths, stable=True)
        feats = []
        for chunk in order.split(bucket):
            length = int(lengths[chunk].max())
            feats.append(self._encode_text_cut(tokens[chunk, :length].to(self.device)))
        out = torch.empty((len(tokens), feats[0].shape[1]), dtype=feats[0].dtype, device=feats[0].device)
        out[order.to(out.device)] = torch.cat(feats)
        return out

    def _encode_text_cut(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's `CLIP.encode_text` on L <= context tokens: positions and causal mask cut to L."""
        from open_clip.transformer import text_global_pool

        m, length = self.model, tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection

    def _precision(self):
        """Autocast where the weights are float32 and the dtype is lower; nothing where they are the dtype."""
        return autocast(self.device, self.dtype) if next(self.model.parameters()).dtype != self.dtype \
            else contextlib.nullcontext()

    @property
    def logit_scale(self) -> float:
        return self._logit_scale




def spec_or_none(transform) -> PixelSpec | None:
    """The transform's PixelSpec, or None when it does more than resize + crop + normalise."""
    try:
        return pixel_spec(transform)
    except ModelLoadError:
        return None


def device_pixels(pixels: torch.Tensor, spec: PixelSpec | None, model: torch.nn.Module,
                  device: torch.device) -> torch.Tensor:
    """Pixels on the model's device, normalised there (in the model's dtype) when they come as uint8."""
    pixels = pixels.to(device, non_blocking=True)
    if pixels.dtype != torch.uint8:
        return pixels.to(next(model.parameters()).dtype)
    if spec is None:
        raise ModelLoadError("uint8 pixels for a model whose transform has no PixelSpec")
    return normalize(pixels, spec, next(model.parameters()).dtype)


def _cuts_text(model: torch.nn.Module, tokenizer) -> bool:
    """True when running captions at their real length gives open_clip's vectors: open_clip's own BPE
    tokenizer (pads with 0, ends with the highest id), a text tower with absolute learned positions, a
    causal mask (no token sees the padding after it) and pooling at the end token ("argmax" or "eos")."""
    from open_clip.tokenizer import SimpleTokenizer

    mask = getattr(model, "attn_mask", None)
    if not isinstance(tokenizer, SimpleTokenizer) or mask is None or not hasattr(model, "positional_embedding"):
        return False
    if getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
        return False
    n = mask.shape[0]
    causal = torch.full((n, n), float("-inf")).triu_(1)
    return model.positional_embedding.shape[0] == n and torch.equal(mask.float().cpu(), causal)
