"""Loading weights: a network built for a strict load skips its random start and ends up exactly as built
with it; torch.nn.init is left as it was found."""

import open_clip
import pytest
import torch

from shardlight.core.config import CONFIG_DIR, ClipSpec
from shardlight.models.clip import ClipEmbedder
from shardlight.models.weights import init_skipped

SHIPPED_CLIP = CONFIG_DIR / "models" / "shapes-clip.safetensors"


def _tensors(model: torch.nn.Module) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}  # non-persistent buffers too


def test_a_clip_loaded_from_a_file_equals_one_built_with_its_random_start():
    built = ClipEmbedder(ClipSpec(model="shapes-clip", pretrained=str(SHIPPED_CLIP)), torch.device("cpu")).model
    torch.manual_seed(1)  # a different random start: the file must overwrite all of it
    reference = open_clip.create_model("shapes-clip", pretrained=str(SHIPPED_CLIP)).eval()
    ours, theirs = _tensors(built), _tensors(reference)
    assert ours.keys() == theirs.keys()
    assert "attn_mask" in ours  # computed by the constructor, not loaded: built as usual
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_init_functions_come_back_even_when_the_build_fails():
    original = torch.nn.init.normal_
    with pytest.raises(RuntimeError), init_skipped():
        weight = torch.full((3,), 7.0)
        assert torch.nn.init.normal_(weight) is weight and torch.equal(weight, torch.full((3,), 7.0))
        raise RuntimeError("the build failed")
    assert torch.nn.init.normal_ is original
    torch.nn.init.normal_(weight)
    assert not torch.equal(weight, torch.full((3,), 7.0))


def test_a_random_clip_is_still_drawn_from_its_seed():
    first = ClipEmbedder(ClipSpec(model="shapes-clip", seed=3), torch.device("cpu")).model
    second = ClipEmbedder(ClipSpec(model="shapes-clip", seed=3), torch.device("cpu")).model
    weights = dict(first.named_parameters())
    assert weights["text_projection"].std() > 0
    assert all(torch.equal(weights[n], p) for n, p in second.named_parameters())
