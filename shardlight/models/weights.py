"""Weights and class names: where a model's parameters come from, loaded safely, with one-line errors.

Weights load only through safetensors or `torch.load(weights_only=True)`; with no network and no local
file the error is one line saying what was looked for and how to supply it. `register_repo_models` makes
the repo's model JSONs (configs/models/) and its timm architectures known to open_clip and timm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from shardlight.core.config import CONFIG_DIR, AugmentSpec, ClipSpec, LabelSpec
from shardlight.core.errors import ModelLoadError, first_line

if TYPE_CHECKING:
    import torch

MODEL_DIR = CONFIG_DIR / "models"


@cache
def register_repo_models() -> None:
    """Make configs/models/*.json CLIP architectures known to open_clip and this repo's timm architectures
    (shardlight/models/architectures.py) known to timm (idempotent)."""
    import open_clip

    import shardlight.models.architectures  # noqa: F401  (registers with timm on import)

    open_clip.add_model_config(MODEL_DIR)


# torch.nn.init's in-place initialisers: what building a network spends its time in (random numbers for
# every parameter) before a checkpoint overwrites them all.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def init_skipped() -> Iterator[None]:
    """Build a network whose weights a strict load will replace, without drawing its random initial values.

    Only sound around a build followed by a strict `load_state_dict` of the whole model: every parameter and
    persistent buffer is then overwritten, and everything else a constructor computes (attention masks,
    positional tables) is computed as usual, since only torch.nn.init's functions become no-ops."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, _unchanged)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _unchanged(tensor, *args, **kwargs):
    return tensor


def is_weights_path(value: str) -> bool:
    return value.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in value or Path(value).exists()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch  # here, not at the top: the CLI checks weight files before it loads torch (flows/cli.py)

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
    if clip is not None and clip.pretrained and is_weights_path(clip.pretrained):
        wanted.append(("CLIP weights", clip.pretrained))
    if labels is not None and labels.kind != "none":
        if labels.checkpoint:
            wanted.append(("classifier weights", labels.checkpoint))
        if isinstance(labels.class_names, str):
            wanted.append(("class_names file", labels.class_names))
    for what, path in wanted:
        if not Path(path).is_file():
            raise ModelLoadError(f"{what} file not found: {path}")


def check_augment_files(spec: AugmentSpec) -> None:
    """Fail fast, before any worker starts, when the enabled stage's DiT weights or VAE folder are missing."""
    if not spec.enabled:
        return
    if not spec.checkpoint or not Path(spec.checkpoint).is_file():
        raise ModelLoadError(f"augment.checkpoint: DiT weights file not found: {spec.checkpoint} (see docs/dit.md)")
    if spec.vae and not Path(spec.vae).is_dir():
        raise ModelLoadError(f"augment.vae: VAE folder not found: {spec.vae} (see docs/dit.md)")


def offline_hint(what: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {what}: {first_line(err, with_type=False)[:160]} — no network to a model hub here? Download the weights "
        "where there is network and point the config at the local file (see README, 'Real pretrained weights')."
    )


def read_class_names(value: list[str] | str | None) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    path = Path(value)
    if not path.is_file():
        raise ModelLoadError(f"class_names file not found: {value}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def class_names_for(num_classes: int) -> list[str]:
    if num_classes != 1000:
        return [str(i) for i in range(num_classes)]
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


