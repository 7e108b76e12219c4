"""Architectures defined by this repo and registered with timm, so they build by name like any timm model.

`shapes_vit_hybrid` is the demo's image model: the hybrid Vision Transformer of Dosovitskiy et al. (2021,
§3.1), where a small convolutional stem makes the patch tokens and a standard ViT follows (CLS token,
learned position embeddings, pre-norm blocks with GELU MLPs). A plain ViT of this size, trained from scratch
on two CPU cores, learns colour but stays near chance on shape within the ~20-minute budget; the stem's local
features and pooling make shape learnable in ~2,000 steps (docs/models.md has the comparison).

Being a timm model, it serves both as the classifier (`labels.model: shapes-vit`) and, through open_clip's
timm image tower (`vision_cfg.timm_model_name`), as CLIP's image encoder, so a trained classifier trunk
drops into CLIP unchanged. Inputs use CLIP's normalisation for the same reason.
"""

from __future__ import annotations

from functools import partial

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import HybridEmbed
from torch import nn

from shardlight.core.errors import ModelLoadError


def conv_stem(widths: tuple[int, ...]) -> nn.Sequential:
    """conv3x3 → BatchNorm → ReLU → 2x2 max-pool per width: each block halves the resolution."""
    layers, in_chans = [], 3
    for width in widths:
        layers += [nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_chans = width
    return nn.Sequential(*layers)


# timm reads this module attribute when registering the model functions below.
default_cfgs = generate_default_cfgs({
    "shapes_vit_hybrid": {
        "input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bicubic",
        "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "num_classes": 24,
        "first_conv": "patch_embed.backbone.0", "classifier": "head",
    },
})


@register_model
def shapes_vit_hybrid(pretrained: bool = False, stem_widths: tuple[int, ...] = (16, 32, 64), **kwargs):
    """64x64 input → conv stem (64 → 8x8 feature map) → 1x1 patches (64 tokens) → ViT, width 64, depth 4."""
    if pretrained:
        raise ModelLoadError("shapes_vit_hybrid has no downloadable weights: pass a local checkpoint "
                             "(configs/models/shapes-vit.safetensors) or train one with `shardlight train-demo-models`")
    kwargs.pop("pretrained_cfg_overlay", None)
    args = dict(img_size=64, patch_size=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
    embed = partial(HybridEmbed, backbone=conv_stem(tuple(stem_widths)))
    return build_model_with_cfg(VisionTransformer, "shapes_vit_hybrid", pretrained=False,
                                embed_layer=embed, **{**args, **kwargs})
