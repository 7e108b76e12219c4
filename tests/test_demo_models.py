"""The shipped demo models load through the pipeline's loaders and meet issue 3's targets on held-out data."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: real hub names must fail fast and clearly

import json

import pytest
import torch

from shardlight.core.config import ClipSpec, LabelSpec
from shardlight.core.errors import ModelLoadError
from shardlight.models.clip import ClipEmbedder
from shardlight.models.labelers import VitLabeler
from shardlight.models.weights import MODEL_DIR, load_weights_file, read_weights_metadata, register_repo_models
from shardlight.training import demo_models as training
from shardlight.training import synthetic

CPU = torch.device("cpu")
CLIP_WEIGHTS = MODEL_DIR / "shapes-clip.safetensors"
VIT_WEIGHTS = MODEL_DIR / "shapes-vit.safetensors"
TEST_SEED = 4242  # neither a training seed nor the seed the model cards were measured on


def _load_clip(path) -> ClipEmbedder:
    return ClipEmbedder(ClipSpec(model="shapes-clip", pretrained=str(path)), CPU)


def _load_vit(path) -> VitLabeler:
    return VitLabeler(LabelSpec(kind="vit", model="shapes-vit", checkpoint=str(path)), CPU)


def _assert_holds_file_weights(model: torch.nn.Module, path) -> None:
    """Every stored fp16 tensor arrived, cast to fp32, in the model (so it is not a random init); integer
    buffers (BatchNorm's batch counters) arrive as they are."""
    stored, state = load_weights_file(path), model.state_dict()
    assert set(stored) == set(state)
    for name, value in stored.items():
        if not value.is_floating_point():
            assert torch.equal(state[name], value), name
            continue
        assert value.dtype == torch.float16 and state[name].dtype == torch.float32, name
        assert torch.equal(state[name], value.float()), name


@pytest.fixture(scope="module")
def held_out() -> list[dict]:
    return training.held_out_samples(TEST_SEED, per_class=10)


@pytest.fixture(scope="module")
def shipped_clip() -> ClipEmbedder:
    return _load_clip(CLIP_WEIGHTS)


@pytest.fixture(scope="module")
def shipped_vit() -> VitLabeler:
    return _load_vit(VIT_WEIGHTS)


def test_test_seed_is_held_out():
    used = {r.train_seed for r in (training.CLIP_RECIPE, training.VIT_RECIPE)}
    used |= {r.eval_seed for r in (training.CLIP_RECIPE, training.VIT_RECIPE)}
    assert TEST_SEED not in used


def test_shipped_weights_are_small_and_carry_their_recipe():
    assert CLIP_WEIGHTS.stat().st_size + VIT_WEIGHTS.stat().st_size < 25 * 2**20
    for path in (CLIP_WEIGHTS, VIT_WEIGHTS):
        meta = read_weights_metadata(path)
        assert json.loads(meta["class_names"]) == list(synthetic.CLASS_NAMES)
        assert json.loads(meta["recipe"])["train_seed"] != TEST_SEED
        assert path.with_suffix(".md").is_file()


def test_shipped_clip_loads_fp16_weights(shipped_clip):
    _assert_holds_file_weights(shipped_clip.model, CLIP_WEIGHTS)
    assert shipped_clip.dim == 128


def test_shipped_vit_loads_fp16_weights(shipped_vit):
    _assert_holds_file_weights(shipped_vit.model, VIT_WEIGHTS)
    assert shipped_vit.class_names == list(synthetic.CLASS_NAMES)


def test_shipped_clip_meets_retrieval_targets(shipped_clip, held_out):
    metrics = training.evaluate_clip(shipped_clip, held_out)
    # The prompts include phrasings never used as training captions.
    assert set(synthetic.EVAL_TEMPLATES) <= set(metrics["per_template"])
    assert metrics["t2i_precision_at_10_min"] >= training.TARGETS["t2i_precision_at_10_min"], metrics
    assert metrics["i2t_top1_min"] >= training.TARGETS["i2t_top1_min"], metrics


def test_shipped_vit_meets_accuracy_target(shipped_vit, held_out):
    metrics = training.evaluate_vit(shipped_vit, held_out)
    assert metrics["eval_images"] == 10 * len(synthetic.CLASS_NAMES)
    assert metrics["top1"] >= training.TARGETS["top1"], metrics


def test_class_prompts_cover_training_and_held_out_phrasings():
    templates = training.class_prompt_templates()
    assert "a {color} {shape}" in templates
    assert set(synthetic.EVAL_TEMPLATES) <= set(templates)
    assert not any("{size}" in t or "{background}" in t for t in templates)


def test_samples_are_deterministic_and_balanced():
    first, again = training.make_samples(7, 2), training.make_samples(7, 2)
    assert [s["jpg"] for s in first] == [s["jpg"] for s in again]
    assert [s["jpg"] for s in first] != [s["jpg"] for s in training.make_samples(8, 2)]
    labels = [training.metadata(s)["label"] for s in first]
    assert sorted(labels) == sorted(list(synthetic.CLASS_NAMES) * 2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_training_writes_loadable_weights_and_cards(tmp_path):
    results = training.train_demo_models(tmp_path, quick=True)
    assert set(results) == {"clip", "vit"}
    _assert_holds_file_weights(_load_clip(tmp_path / "shapes-clip.safetensors").model,
                               tmp_path / "shapes-clip.safetensors")
    _assert_holds_file_weights(_load_vit(tmp_path / "shapes-vit.safetensors").model,
                               tmp_path / "shapes-vit.safetensors")
    clip_card = (tmp_path / "shapes-clip.md").read_text()
    assert training.REPRODUCE in clip_card
    assert f"| i2t_top1_min | {results['clip']['i2t_top1_min']:.3f} |" in clip_card
    vit_card = (tmp_path / "shapes-vit.md").read_text()
    assert f"| top1 | {results['vit']['top1']:.3f} |" in vit_card
    assert f"| eval_seed | {training.VIT_RECIPE.eval_seed} |" in vit_card


def test_offline_hub_clip_name_is_one_clear_line():
    with pytest.raises(ModelLoadError) as err:
        ClipEmbedder(ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"), CPU)
    message = str(err.value)
    assert "\n" not in message and "laion2b_s34b_b79k" in message and "local file" in message


@pytest.mark.timeout(120)
def test_offline_hub_timm_name_is_one_clear_line():
    with pytest.raises(ModelLoadError) as err:
        VitLabeler(LabelSpec(kind="vit", model="vit_base_patch16_224", pretrained=True), CPU)
    message = str(err.value)
    assert "\n" not in message and "vit_base_patch16_224" in message and "local file" in message


@pytest.mark.parametrize("load", [_load_clip, _load_vit], ids=["clip", "vit"])
def test_missing_local_weights_file_is_one_clear_line(load, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelLoadError) as err:
        load(missing)
    assert "\n" not in str(err.value) and str(missing) in str(err.value)


def test_clip_image_tower_from_vit_computes_the_same_features():
    """The LiT initialisation puts the ViT trunk into CLIP's timm tower: same inputs, same pooled features."""
    import open_clip

    register_repo_models()
    torch.manual_seed(0)
    labeler = VitLabeler(LabelSpec(kind="vit", model="shapes-vit"), CPU)
    vit = labeler.model
    with torch.no_grad():
        for param in vit.parameters():  # away from the init, so every copied tensor matters
            param.add_(torch.randn_like(param) * 0.05)
    clip, _, preprocess = open_clip.create_model_and_transforms("shapes-clip")
    training.init_image_tower_from_vit(clip.visual, vit)
    samples = training.make_samples(3, 1)
    vit.eval(), clip.eval()
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(training.to_pixels(samples, labeler.transform)),
                                    pre_logits=True)
        actual = clip.visual.trunk(training.to_pixels(samples, preprocess))  # the trunk, before CLIP's projection
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_repo_architecture_builds_by_name_and_has_no_hub_weights():
    import timm

    register_repo_models()
    model = timm.create_model("shapes_vit_hybrid", num_classes=24)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 24)
    with pytest.raises(ModelLoadError) as err:
        timm.create_model("shapes_vit_hybrid", pretrained=True)
    assert "\n" not in str(err.value) and "local checkpoint" in str(err.value)
